"""The CLIP stage: a tiny open_clip model trained on ShapesWorld, its embedding cache, and loading.

unCLIP lives in CLIP's latent space: the prior maps a caption to a CLIP image embedding z_i and
the decoder inverts z_i into pixels. No weights can be downloaded here, so the course trains its
own CLIP, with open_clip itself:

- our architectures are open_clip JSON model configs in ``unclip_lite/model_configs``, registered
  with ``open_clip.add_model_config``, so ``open_clip.create_model("shapes-clip-32")`` works like
  any open_clip model;
- the contrastive loss is open_clip's ``ClipLoss``, extended to several positives per row:
  ShapesWorld captions repeat ("a red circle" describes many scenes), and a plain InfoNCE loss
  would push a caption away from every other scene it describes (see `MultiPositiveClipLoss`);
- `load_clip(name, pretrained=...)` passes through to open_clip, so real pretrained weights
  (ViT-B-32 from a local file) load the same way as ours.

`ClipModel` wraps a model with its tokenizer and preprocessing and gives `encode_images`,
`encode_texts` and `text_states` (the per-token states the decoder and prior attend to).
`embedding_cache` computes a dataset's embeddings once and stores them as an artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import ClipConfig, Preset, from_dict, to_dict
from .data import dataset_key, rendered
from .runtime import attention_backend, autocast, resolve_device, resolve_precision, seed_everything
from .shapes import (BACKGROUNDS, COLOURS, PROMPT_ATTRIBUTES, SHAPES, SIZES, ShapesWorld, caption_codes,
                     match_matrix, partial_caption, scene_codes)
from .train import clear_state, ensure_stage, train

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
OUR_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
_registered = False


def register_models() -> None:
    """Register our JSON model configs with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


# ---------------------------------------------------------------------------------------------
# The model wrapper


class ClipModel:
    """An open_clip model with its tokenizer and tensor preprocessing.

    Images may be uint8 (N, 3, H, W) tensors (ShapesWorld's cache), float tensors in [-1, 1]
    (the diffusion models' output) or uint8 (N, H, W, 3) arrays; they are resized to the model's
    input size on the tensor side (no PIL round trip) and normalised with its mean and std.
    """

    def __init__(self, model: nn.Module, name: str, device: str = "auto", precision: str = "auto",
                 tokenizer=None):
        self.name = name
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer or open_clip.get_tokenizer(name)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        self.embed_dim = int(model.text_projection.shape[1]) if model.text_projection is not None else None
        self.context_length = int(model.context_length)
        self.width = int(model.transformer.width)

    # -- inputs --------------------------------------------------------------------------------
    def prepare(self, images) -> torch.Tensor:
        """Images (see the class docstring) -> the model's normalised float input."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float().add(1).div(2)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.image_size).clamp(0, 1)
        return (x - self.mean) / self.std

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids (N, context_length); longer texts are truncated by the tokenizer."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def _ctx(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(autocast(self.device, self.precision))
        if self.device.type == "cpu":
            stack.enter_context(attention_backend())
        return stack

    # -- encoders ------------------------------------------------------------------------------
    def encode_images(self, images, batch_size: int = 512, normalize: bool = True) -> torch.Tensor:
        """CLIP image embeddings z_i, float32 (N, embed_dim), unit norm by default."""
        out = []
        for i in range(0, len(images), batch_size):
            x = self.prepare(images[i:i + batch_size]).to(self.device)
            with self._ctx():
                z = self.model.encode_image(x).float()
            out.append((F.normalize(z, dim=-1) if normalize else z).cpu())  # normalised in fp32
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def encode_texts(self, texts: list[str], batch_size: int = 1024, normalize: bool = True) -> torch.Tensor:
        """CLIP text embeddings z_t, float32 (N, embed_dim), unit norm by default."""
        return self.text_states(texts, batch_size, normalize)["embedding"]

    def text_states(self, texts: list[str], batch_size: int = 1024, normalize: bool = True) -> dict:
        """Per-token text states for cross-attention, with the pooled embedding.

        Returns {"embedding": (N, embed_dim) z_t, "states": (N, L, width) the final layer's
        token states (after ln_final, before the projection), "mask": (N, L) bool, True for real
        tokens (start, words, end), "tokens": (N, L)}. The text transformer is causal, so token k
        has read tokens 0..k; the end token has read the whole caption.
        """
        if isinstance(texts, str):
            raise TypeError("text_states takes a list of strings")
        embs, states, masks, toks = [], [], [], []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i:i + batch_size])
            with self._ctx():
                emb, st = encode_text_with_states(self.model, tokens.to(self.device))
            embs.append((F.normalize(emb.float(), dim=-1) if normalize else emb.float()).cpu())
            states.append(st.float().cpu())
            masks.append(_token_mask(tokens))
            toks.append(tokens)
        if not embs:
            return {"embedding": torch.empty(0, self.embed_dim), "states": torch.empty(0, self.context_length, self.width),
                    "mask": torch.empty(0, self.context_length, dtype=torch.bool),
                    "tokens": torch.empty(0, self.context_length, dtype=torch.long)}
        return {"embedding": torch.cat(embs), "states": torch.cat(states), "mask": torch.cat(masks),
                "tokens": torch.cat(toks)}


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, 3, H, W) images resized to size x size (antialiased), still uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=images.shape[-1] > size).round().clamp(0, 255).to(torch.uint8)
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def _token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True up to and including the end-of-text token (the largest id in open_clip's BPE)."""
    eot = tokens.argmax(dim=-1, keepdim=True)
    return torch.arange(tokens.shape[1]).unsqueeze(0) <= eot


def encode_text_with_states(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's `CLIP.encode_text`, step by step, also returning the per-token states.

    Follows the installed open_clip (token embedding, positional embedding, causal transformer,
    ln_final, pooling at the end token, projection); a test checks that the pooled result equals
    ``model.encode_text``.
    """
    if not hasattr(model, "token_embedding"):
        raise TypeError(f"{type(model).__name__} keeps its text tower in a submodule; per-token states are "
                        "implemented for open_clip's CLIP class (the built-in text transformer)")
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    states = model.ln_final(x)
    pooled = open_clip.transformer.text_global_pool(states, tokens, model.text_pool_type,
                                                    eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        pooled = model.text_projection(pooled) if isinstance(model.text_projection, nn.Linear) \
            else pooled @ model.text_projection
    return pooled, states


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def load_clip(name: str, pretrained: str | None = None, device: str = "auto", precision: str = "auto",
              **kwargs) -> ClipModel:
    """Create an open_clip model by name, with weights from `pretrained`, wrapped as a ClipModel.

    `name` is one of our configs (``OUR_MODELS``) or any open_clip name ("ViT-B-32"). `pretrained`
    is passed to open_clip unchanged: a local file (``.safetensors``, ``.bin``, ``.pt``; our
    stage's ``model.safetensors`` is one) or a tag such as "openai" that open_clip resolves in its
    local cache (``cache_dir=`` in `kwargs`). Nothing is downloaded unless open_clip can reach
    the internet, which this machine cannot.
    """
    register_models()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {name!r}; ours are {list(OUR_MODELS)}, open_clip has "
                         f"{len(open_clip.list_models())} more (open_clip.list_models())")
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"pretrained weights {pretrained} not found")
    quiet = _DropMessage("No pretrained weights loaded")  # expected: ours start from scratch
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)
    return ClipModel(model, name, device=device, precision=precision)


# ---------------------------------------------------------------------------------------------
# Loss


class MultiPositiveClipLoss(open_clip.ClipLoss):
    """open_clip's ClipLoss with a positives matrix instead of the identity.

    ``positives[a, b]`` is True when caption a describes image b. Each row's target distribution
    spreads evenly over its positives, in both directions (image -> captions, caption -> images):

        L = -1/2B sum_b sum_a q_ab log softmax_a(s z_b.t_a) - 1/2B sum_a sum_b p_ab log softmax_b(s t_a.z_b)

    With ``positives = I`` this is exactly open_clip's loss (a test checks it). Without it, a batch
    holding two red circles would teach CLIP that "a red circle" does *not* describe the second.
    """

    def forward(self, image_features, text_features, logit_scale, positives=None, logit_bias=None, output_dict=False):
        if positives is None:
            return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        p = positives.to(logits_per_text.dtype)
        text_targets = p / p.sum(1, keepdim=True)  # caption a -> images it describes
        image_targets = p.T / p.T.sum(1, keepdim=True)  # image b -> captions that describe it
        total = (F.cross_entropy(logits_per_image, image_targets) + F.cross_entropy(logits_per_text, text_targets)) / 2
        return {"contrastive_loss": total} if output_dict else total


LOSS = MultiPositiveClipLoss()
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned temperature at 100


def clip_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The training loss for `train`: contrastive with multi-positives, in bf16 where enabled."""
    ctx = attention_backend() if batch["image"].device.type == "cpu" else contextlib.nullcontext()
    with ctx:
        zi = model.encode_image(batch["image"], normalize=True)
        zt = model.encode_text(batch["text"], normalize=True)
    scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    loss = LOSS(zi.float(), zt.float(), scale.float(), batch["positives"])
    return loss, {"logit_scale": scale.detach()}


# ---------------------------------------------------------------------------------------------
# Training data


def _caption_ids(data: dict) -> dict | None:
    """None for ShapesWorld data (captions match scenes by attributes); for a user's folder,
    caption text -> id (only identical captions match)."""
    if all("objects" in a for a in data["attributes"]):
        return None
    return {c: k for k, c in enumerate(sorted(set(data["captions"])))}


def scene_keys(data: dict) -> np.ndarray:
    """Match codes for a dataset's scenes: ShapesWorld attributes where every entry has them,
    otherwise the caption text itself."""
    ids = _caption_ids(data)
    if ids is None:
        return scene_codes(data["attributes"])
    return np.array([[ids[c]] for c in data["captions"]], dtype=np.int64)


def _caption_keys(captions: list[str], ids: dict | None) -> np.ndarray:
    """Match codes for captions, the counterpart of `scene_keys` (`ids` from `_caption_ids`)."""
    if ids is None:
        return caption_codes(captions)
    return np.array([[ids.get(c, -3)] for c in captions], dtype=np.int64)


class ClipBatches:
    """`get_batch(step)` for CLIP training: images, token ids and the positives matrix.

    A share `p_partial_caption` of one-object scenes gets a partial caption instead of its own
    ("a red shape", "a star on a dotted background"), so the text tower learns that a caption
    may leave attributes out (it is also how the zero-shot prompts read).
    """

    def __init__(self, clip: ClipModel, data: dict, batch_size: int, p_partial: float, seed: int):
        self.clip, self.batch_size, self.p_partial, self.seed = clip, batch_size, p_partial, seed
        self.images = resize_uint8(data["images"], clip.image_size)  # normalised per batch: 4x less memory
        self.captions = list(data["captions"])
        self.attributes = data["attributes"]
        self.ids = _caption_ids(data)
        self.p_partial = p_partial if self.ids is None else 0.0  # partial captions need attributes
        self.scene = torch.from_numpy(scene_keys(data))
        self.caption_key = torch.from_numpy(_caption_keys(self.captions, self.ids))
        self.one_object = torch.tensor([a.get("count", 1) == 1 for a in self.attributes])
        unique = sorted(set(self.captions))
        self._token_cache = dict(zip(unique, clip.tokenize(unique)))

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self._token_cache]
        if missing:
            self._token_cache.update(zip(missing, self.clip.tokenize(missing)))
        return torch.stack([self._token_cache[c] for c in captions])

    def sample(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """The rows, captions and caption match keys of step `step`'s batch (a pure function)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(len(self.images), (self.batch_size,), generator=g)
        captions = [self.captions[i] for i in idx.tolist()]
        keys = self.caption_key[idx].clone()
        if self.p_partial > 0:
            rng = np.random.default_rng([self.seed, step])
            swap = ((torch.rand(len(idx), generator=g) < self.p_partial) & self.one_object[idx]).nonzero().flatten().tolist()
            for k in swap:
                named = [a for a in PROMPT_ATTRIBUTES if rng.random() < 0.4] or [PROMPT_ATTRIBUTES[rng.integers(4)]]
                captions[k] = partial_caption(self.attributes[idx[k]], named, rng)
            if swap:
                keys[swap] = torch.from_numpy(caption_codes([captions[k] for k in swap]))
        return idx, captions, keys

    def __call__(self, step: int) -> dict:
        idx, captions, keys = self.sample(step)
        positives = torch.from_numpy(np.asarray(match_matrix(keys.numpy(), self.scene[idx].numpy())))
        images = self.clip.prepare(self.images[idx]).contiguous(memory_format=torch.channels_last)
        return {"image": images, "text": self._tokens(captions), "positives": positives}


# ---------------------------------------------------------------------------------------------
# Metrics


def prompts_for(attribute: str) -> dict[str, list[str]]:
    """Zero-shot prompts per class of one attribute, with every synonym (their embeddings are
    averaged: prompt ensembling, as in the CLIP paper)."""
    classes = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "background": BACKGROUNDS}[attribute]
    out = {}
    for value in classes:
        scene = {"background": value if attribute == "background" else "black",
                 "objects": [{"shape": value if attribute == "shape" else "circle",
                              "colour": value if attribute == "colour" else "red",
                              "size": value if attribute == "size" else "small"}]}
        texts = set()
        for seed in range(16):  # enough draws to see every synonym
            texts.add(partial_caption(scene, (attribute,), np.random.default_rng(seed)))
        out[value] = sorted(texts)
    return out


def zero_shot(clip: ClipModel, image_emb: torch.Tensor, attributes: list[dict]) -> dict:
    """Zero-shot accuracy per attribute by prompting ("a red shape", "a star", ...).

    Shape, colour and size are scored on one-object scenes (in a two-object scene "a red shape"
    is ambiguous); background on every scene. Returns {attribute: accuracy, "n": {...}}.
    """
    result, counts = {}, {}
    for attribute in PROMPT_ATTRIBUTES:
        prompts = prompts_for(attribute)
        classes = list(prompts)
        class_emb = torch.stack([F.normalize(clip.encode_texts(prompts[c]).mean(0), dim=0) for c in classes])
        if attribute == "background":
            keep = list(range(len(attributes)))
            truth = [a["background"] for a in attributes]
        else:
            keep = [i for i, a in enumerate(attributes) if a["count"] == 1]
            truth = [attributes[i]["objects"][0][attribute] for i in keep]
        if not keep:
            continue
        pred = (image_emb[keep] @ class_emb.T).argmax(1)
        result[attribute] = float(np.mean([classes[p] == t for p, t in zip(pred.tolist(), truth)]))
        counts[attribute] = len(keep)
    result["n"] = counts
    return result


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, data: dict, k: int = 5) -> dict:
    """Attribute-matched retrieval between a dataset's images and its captions.

    caption->image: for each caption, is the nearest image one it describes (top-1), or among
    the k nearest (top-k)? image->caption: for each image, is the nearest caption (among every
    caption of the set) one that describes it? A hit is any attribute match, not just the
    caption's own image: "a red circle" has many right answers.
    """
    keys = _caption_keys(data["captions"], _caption_ids(data))
    match = torch.from_numpy(np.asarray(match_matrix(keys, scene_keys(data))))
    sim = text_emb @ image_emb.T  # (captions, images)
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices
    t2i_1 = match.gather(1, topk[:, :1]).any(1).float().mean()
    t2i_k = match.gather(1, topk).any(1).float().mean()
    i2t = match.T.gather(1, sim.T.argmax(1, keepdim=True)).float().mean()
    return {"caption_to_image_top1": float(t2i_1), f"caption_to_image_top{k}": float(t2i_k),
            "image_to_caption_top1": float(i2t), "n": len(data["captions"])}


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
    """How far apart the image and text embeddings sit (Liang et al. 2022, "Mind the Gap").

    "gap": the distance between the two modalities' centroids (unit-norm embeddings; 0 if they
    shared one region); "cos_paired": the mean cosine of a caption with its own image;
    "cos_image_image" / "cos_text_text": mean cosine between random pairs within a modality.
    """
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(image_emb), generator=g)
    return {
        "gap": float((image_emb.mean(0) - text_emb.mean(0)).norm()),
        "cos_paired": float((image_emb * text_emb).sum(1).mean()),
        "cos_image_image": float((image_emb * image_emb[perm]).sum(1).mean()),
        "cos_text_text": float((text_emb * text_emb[perm]).sum(1).mean()),
    }


def evaluate_clip(clip: ClipModel, world, n: int, cache_dir: Path | None = None) -> dict:
    """Zero-shot accuracy, retrieval and the modality gap on the val and held-out splits."""
    report = {}
    for split in ("val", "heldout"):
        data = rendered(ShapesWorld(split, world), n, cache_dir)
        zi, zt = clip.encode_images(data["images"]), clip.encode_texts(data["captions"])
        report[split] = {"zero_shot": zero_shot(clip, zi, data["attributes"]),
                         "retrieval": retrieval(zi, zt, data), "modality_gap": modality_gap(zi, zt)}
    return report


# ---------------------------------------------------------------------------------------------
# Training and the artifact


def _stage_config(preset: Preset) -> dict:
    """What the CLIP artifact depends on: its own config and the world it was trained on."""
    return {"clip": to_dict(preset.clip), "world": to_dict(preset.world)}


def train_clip(preset: Preset, out_dir: str | Path, progress: bool = True) -> ClipModel:
    """Train CLIP on ShapesWorld's train split and save it as the `clip` artifact.

    The artifact's ``model.safetensors`` is a plain open_clip state dict: it loads with
    ``open_clip.create_model(name, pretrained=<path>)`` as well as with `load_clip_stage`.
    """
    cfg, out_dir = preset.clip, Path(out_dir)
    cache = out_dir.parent / "cache"
    data = rendered(ShapesWorld("train", preset.world), cfg.n_train_images, cache)
    stage_config = _stage_config(preset)
    seed_everything(cfg.train.seed)
    clip = load_clip(cfg.model, device=cfg.train.device, precision=cfg.train.precision)
    clip.model.visual.to(memory_format=torch.channels_last)  # measured: 1.3-1.5x faster convolutions
    batches = ClipBatches(clip, data, cfg.train.batch_size, cfg.p_partial_caption, cfg.train.seed)
    train_metrics = train(clip.model, clip_loss, batches, cfg.train, run_dir=out_dir, progress=progress,
                          desc="clip", run_config=stage_config)
    clip.model.eval()
    metrics = {"train": train_metrics, "eval": evaluate_clip(clip, preset.world, cfg.n_eval, cache),
               "n_params": sum(p.numel() for p in clip.model.parameters()),
               "logit_scale": float(clip.model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))}
    ckpt.save_stage(out_dir, "clip", {k: v.contiguous() for k, v in clip.model.state_dict().items()},
                    stage_config, metrics, extra={"open_clip_model": cfg.model})
    clear_state(out_dir)
    clip.metrics = ckpt.read_json(out_dir / ckpt.METRICS)
    clip.folder = out_dir
    return clip


def load_clip_stage(folder: str | Path, preset: Preset | None = None) -> ClipModel:
    """Load the `clip` artifact (through open_clip's own `pretrained=` path loading); with
    `preset`, its stored config must match."""
    folder = Path(folder)
    _, meta, metrics = ckpt.load_stage(folder, "clip", _stage_config(preset) if preset else None)
    cfg = from_dict(ClipConfig, meta["config"]["clip"])
    clip = load_clip(meta["open_clip_model"], pretrained=str(folder / ckpt.WEIGHTS), device=cfg.train.device)
    clip.metrics, clip.folder = metrics, folder
    return clip


def ensure_clip(artifacts_dir: str | Path, preset: Preset, retrain: bool = False, progress: bool = True) -> ClipModel:
    """Load CLIP from `artifacts_dir/clip`, training it first if it is missing.

    As with the judge, a stored CLIP made with another config (or `retrain=True`) is moved aside
    to `clip.stale-<time>` first; nothing saved is lost.
    """
    folder = Path(artifacts_dir) / "clip"
    return ensure_stage(folder, "CLIP", lambda: load_clip_stage(folder, preset),
                        lambda: train_clip(preset, folder, progress=progress), retrain)


# ---------------------------------------------------------------------------------------------
# The embedding cache


def _fingerprint(clip: ClipModel) -> str:
    """Identifies the CLIP weights: the sha1 of its artifact file, or of the tensors."""
    folder = getattr(clip, "folder", None)
    h = hashlib.sha1()
    if folder is not None and (Path(folder) / ckpt.WEIGHTS).exists():
        with open(Path(folder) / ckpt.WEIGHTS, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for k, v in sorted(clip.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def embedding_cache(clip: ClipModel, dataset, n: int | None = None, cache_dir: str | Path | None = None,
                    states: bool = True) -> dict:
    """A dataset's CLIP embeddings, computed once and stored as an artifact.

    Returns {"image_emb": (N, D), "text_emb": (N, D), "captions", "attributes"} and, with
    `states`, the per-token text states stored once per *distinct* caption (captions repeat):
    "caption_index" (N,) into "text_states" (U, L, width) bf16 and "text_mask" (U, L), with "L"
    trimmed to the longest caption. z_i and z_t are unit-norm float32.

    The cache lives in `cache_dir/clip-<split>-<key>`, keyed by the dataset, n and the CLIP
    weights' fingerprint, so a retrained CLIP never reads stale embeddings.
    """
    n = len(dataset) if n is None else min(n, len(dataset))
    folder, fingerprint = None, None
    if cache_dir is not None:
        fingerprint = _fingerprint(clip)
        key = hashlib.sha1(json.dumps([dataset_key(dataset, n), fingerprint, states]).encode()).hexdigest()[:12]
        folder = Path(cache_dir) / f"clip-{getattr(dataset, 'split', 'folder')}-{key}"
        if (folder / "embeddings.safetensors").exists() and (folder / "samples.json").exists():
            tensors = ckpt.load_tensors(folder / "embeddings.safetensors")
            meta = ckpt.read_json(folder / "samples.json")
            return {**tensors, "captions": meta["captions"], "attributes": meta["attributes"]}
    data = rendered(dataset, n, None if cache_dir is None else Path(cache_dir))
    out = {"image_emb": clip.encode_images(data["images"]), "captions": data["captions"],
           "attributes": data["attributes"]}
    unique = sorted(set(data["captions"]))
    index = {c: k for k, c in enumerate(unique)}
    text = clip.text_states(unique)
    out["text_emb"] = text["embedding"][torch.tensor([index[c] for c in data["captions"]], dtype=torch.long)]
    if states:
        length = int(text["mask"].sum(1).max()) if len(unique) else 0
        out["caption_index"] = torch.tensor([index[c] for c in data["captions"]], dtype=torch.long)
        out["text_states"] = text["states"][:, :length].to(torch.bfloat16).contiguous()
        out["text_mask"] = text["mask"][:, :length].contiguous()
    if folder is not None:
        ckpt.save_tensors(folder / "embeddings.safetensors",
                          {k: v for k, v in out.items() if isinstance(v, torch.Tensor)})
        ckpt.write_json(folder / "samples.json", {"captions": out["captions"], "attributes": out["attributes"],
                                                  "clip": clip.name, "clip_fingerprint": fingerprint})
    return out


# ---------------------------------------------------------------------------------------------
# What the embedding keeps: linear probes


def linear_probe(features: torch.Tensor, targets, train_fraction: float = 0.7,
                 ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> float:
    """How much of `targets` a linear map reads off `features`, on held-out rows.

    Ridge regression on standardised features, trained on the first `train_fraction` of the rows
    (the ridge strength picked on the last fifth of those) and scored on the rest. Categorical
    targets (a list of strings) are one-hot encoded and scored by accuracy; numeric targets
    (N,) or (N, K) are scored by R^2 (1: fully readable, 0: no better than the mean).
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    categorical = isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], str)
    if categorical:
        classes = sorted(set(targets))
        y = F.one_hot(torch.tensor([classes.index(t) for t in targets]), len(classes)).double()
    else:
        y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
        y = y[:, None] if y.ndim == 1 else y
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} targets")
    n_train = int(len(x) * train_fraction)
    n_fit = int(n_train * 0.8)
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def fit(rows: slice, ridge: float) -> torch.Tensor:
        xt = x[rows]
        eye = torch.eye(x.shape[1], dtype=x.dtype) * ridge * len(xt)
        eye[-1, -1] = 0  # no penalty on the bias
        return torch.linalg.solve(xt.T @ xt + eye, xt.T @ y[rows])

    def score(w: torch.Tensor, rows: slice) -> float:
        pred, truth = x[rows] @ w, y[rows]
        if categorical:
            return float((pred.argmax(1) == truth.argmax(1)).double().mean())
        resid = ((pred - truth) ** 2).sum(0)
        total = ((truth - truth.mean(0)) ** 2).sum(0).clamp_min(1e-12)
        return float((1 - resid / total).mean())

    best = max(ridges, key=lambda r: score(fit(slice(0, n_fit), r), slice(n_fit, n_train)))
    return score(fit(slice(0, n_train), best), slice(n_train, None))


def what_it_keeps(features: dict[str, torch.Tensor], data: dict) -> dict:
    """Linear probes of one-object scenes' attributes from several image representations.

    `features` maps a name to (N, D) features of `data`'s images, e.g. {"z_i": CLIP image
    embeddings, "judge": the judge's features, "pixels": `pixels(data, 16)`}. Returns
    {target: {name: score, ..., "score": "accuracy" | "R^2"}} for the attributes captions name
    (shape, colour, size, background: accuracy) and the details they leave out (x and y
    position, and rotation as (cos, sin) of symmetry x angle on shapes whose rotation shows: R^2).
    """
    from .shapes import SYMMETRY
    one = [i for i, a in enumerate(data["attributes"]) if a["count"] == 1]
    objs = [data["attributes"][i]["objects"][0] for i in one]
    feats = {name: torch.as_tensor(f)[one] for name, f in features.items()}
    targets = {k: [o[k] for o in objs] for k in ("shape", "colour", "size")}
    targets["background"] = [data["attributes"][i]["background"] for i in one]
    targets["x position"] = [o["x"] for o in objs]
    targets["y position"] = [o["y"] for o in objs]
    out = {}
    for name, target in targets.items():
        out[name] = {f: linear_probe(x, target) for f, x in feats.items()}
        out[name]["score"] = "accuracy" if isinstance(target[0], str) else "R^2"
    rotated = [k for k, o in enumerate(objs) if SYMMETRY[o["shape"]]]
    angle = np.array([SYMMETRY[objs[k]["shape"]] * objs[k]["rotation"] for k in rotated])
    rot = np.stack([np.cos(angle), np.sin(angle)], 1)
    out["rotation"] = {f: linear_probe(x[rotated], rot) for f, x in feats.items()}
    out["rotation"]["score"] = "R^2"
    return out


def pixels(data: dict, size: int = 16) -> torch.Tensor:
    """A dataset's images as flat pixel vectors at `size` px, in [0, 1]: the probes' baseline."""
    return resize_uint8(data["images"], size).flatten(1).float() / 255


def pca_project(x: torch.Tensor, k: int = 2, fit: torch.Tensor | None = None) -> torch.Tensor:
    """Project rows of `x` on the top-k principal axes of `fit` (default: of `x` itself)."""
    ref = (x if fit is None else fit).double()
    mean = ref.mean(0)
    _, _, v = torch.linalg.svd(ref - mean, full_matrices=False)
    return ((x.double() - mean) @ v[:k].T).float()


def gap_axis(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each embedding's coordinate along the line joining the two modalities' centroids."""
    axis = F.normalize(image_emb.mean(0) - text_emb.mean(0), dim=0)
    return image_emb @ axis, text_emb @ axis


def description_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor, data: dict) -> dict:
    """Mean cosine between embeddings that share a description, within and across modalities.

    "image_image": an image and another image its caption also describes; "text_image": a
    caption and the images it describes. If z_t could stand in for z_i, the two would be close.
    """
    keys = _caption_keys(data["captions"], _caption_ids(data))
    match = torch.from_numpy(np.asarray(match_matrix(keys, scene_keys(data))))
    ii = image_emb @ image_emb.T
    other = match & ~torch.eye(len(match), dtype=torch.bool)
    ti = text_emb @ image_emb.T
    return {"image_image": float(ii[other].mean()), "text_image": float(ti[match].mean()),
            "pairs": int(other.sum())}
