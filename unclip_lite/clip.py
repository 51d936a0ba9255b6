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
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import ClipConfig, Preset, from_dict, to_dict
from .data import dataset, dataset_key, eval_splits, rendered, source_config, uses_folder
from .clip_model import ClipModel, load_clip
from .images import resize_uint8
from .runtime import attention_backend, main_process_first, seed_everything, world
from .shapes import (BACKGROUNDS, COLOURS, PROMPT_ATTRIBUTES, SHAPES, SIZES, caption_codes,
                     match_matrix, partial_caption, scene_codes)
from .stage import ensure_stage
from .train import clear_state, train

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
    """The training loss for `train`: contrastive with multi-positives, in bf16 where enabled.

    Under torchrun each rank encodes its slice of the batch and open_clip's own distributed loss
    (`world_size`, `rank`, `gather_with_grad=True`) gathers every rank's features, so each rank
    scores the whole global batch against the global positives matrix (passed unsharded)."""
    ctx = attention_backend() if batch["image"].device.type == "cpu" else contextlib.nullcontext()
    with ctx:
        zi, zt, scale = model(batch["image"], batch["text"])[:3]  # through forward(): DDP needs it
    scale = scale.clamp(max=MAX_LOGIT_SCALE)
    rank, size = world()
    loss_fn = LOSS if size == 1 else MultiPositiveClipLoss(gather_with_grad=True, rank=rank, world_size=size)
    loss = loss_fn(zi.float(), zt.float(), scale.float(), batch["positives"])
    return loss, {"logit_scale": scale.detach()}


# ---------------------------------------------------------------------------------------------
# Training data


def caption_ids(data: dict) -> dict | None:
    """None for ShapesWorld data (captions match scenes by attributes); for a user's folder,
    caption text -> id (only identical captions match)."""
    if all("objects" in a for a in data["attributes"]):
        return None
    return {c: k for k, c in enumerate(sorted(set(data["captions"])))}


def scene_keys(data: dict) -> np.ndarray:
    """Match codes for a dataset's scenes: ShapesWorld attributes where every entry has them,
    otherwise the caption text itself."""
    ids = caption_ids(data)
    if ids is None:
        return scene_codes(data["attributes"])
    return np.array([[ids[c]] for c in data["captions"]], dtype=np.int64)


def caption_keys(captions: list[str], ids: dict | None) -> np.ndarray:
    """Match codes for captions, the counterpart of `scene_keys` (`ids` from `caption_ids`)."""
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
        self.ids = caption_ids(data)
        self.p_partial = p_partial if self.ids is None else 0.0  # partial captions need attributes
        self.scene = torch.from_numpy(scene_keys(data))
        self.caption_key = torch.from_numpy(caption_keys(self.captions, self.ids))
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
        return {"image": images, "text": self._tokens(captions), "positives": positives,
                "unsharded": ("positives",)}  # (B, B): the loss scores the global batch on every rank


# ---------------------------------------------------------------------------------------------
# Metrics


def caption_states(clip: ClipModel, captions: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one caption -> (token states (N, L, width), mask (N, L)) path, for the decoder and both
    priors: CLIP's token states padded (masked) to at least `length` tokens (a stage's cache
    length, so that batches line up with training) and never cutting a caption short."""
    out = clip.text_states(list(captions))
    keep = max(length or 0, int(out["mask"].sum(1).max()))
    return out["states"][:, :keep], out["mask"][:, :keep]


def no_caption(clip: ClipModel, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "caption dropped" input: one masked-out token per sample (the decoder's learned null)."""
    return torch.zeros(n, 1, clip.width), torch.zeros(n, 1, dtype=torch.bool)


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


def zero_shot(clip: ClipModel, image_embed: torch.Tensor, attributes: list[dict]) -> dict:
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
        pred = (image_embed[keep] @ class_emb.T).argmax(1)
        result[attribute] = float(np.mean([classes[p] == t for p, t in zip(pred.tolist(), truth)]))
        counts[attribute] = len(keep)
    result["n"] = counts
    return result


def retrieval(image_embed: torch.Tensor, text_embed: torch.Tensor, data: dict, k: int = 5) -> dict:
    """Attribute-matched retrieval between a dataset's images and its captions.

    caption->image: for each caption, is the nearest image one it describes (top-1), or among
    the k nearest (top-k)? image->caption: for each image, is the nearest caption (among every
    caption of the set) one that describes it? A hit is any attribute match, not just the
    caption's own image: "a red circle" has many right answers.
    """
    keys = caption_keys(data["captions"], caption_ids(data))
    match = torch.from_numpy(np.asarray(match_matrix(keys, scene_keys(data))))
    sim = text_embed @ image_embed.T  # (captions, images)
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices
    t2i_1 = match.gather(1, topk[:, :1]).any(1).float().mean()
    t2i_k = match.gather(1, topk).any(1).float().mean()
    i2t = match.T.gather(1, sim.T.argmax(1, keepdim=True)).float().mean()
    return {"caption_to_image_top1": float(t2i_1), f"caption_to_image_top{k}": float(t2i_k),
            "image_to_caption_top1": float(i2t), "n": len(data["captions"])}


def modality_gap(image_embed: torch.Tensor, text_embed: torch.Tensor) -> dict:
    """How far apart the image and text embeddings sit (Liang et al. 2022, "Mind the Gap").

    "gap": the distance between the two modalities' centroids (unit-norm embeddings; 0 if they
    shared one region); "cos_paired": the mean cosine of a caption with its own image;
    "cos_image_image" / "cos_text_text": mean cosine between random pairs within a modality.
    """
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(image_embed), generator=g)
    return {
        "gap": float((image_embed.mean(0) - text_embed.mean(0)).norm()),
        "cos_paired": float((image_embed * text_embed).sum(1).mean()),
        "cos_image_image": float((image_embed * image_embed[perm]).sum(1).mean()),
        "cos_text_text": float((text_embed * text_embed[perm]).sum(1).mean()),
    }


def evaluate_clip(clip: ClipModel, preset: Preset, n: int, cache_dir: Path | None = None) -> dict:
    """Retrieval and the modality gap on the val and held-out splits (a caption folder: its val
    split), and on ShapesWorld zero-shot accuracy per attribute."""
    report = {}
    for split in eval_splits(preset):
        data = rendered(dataset(preset, split), n, cache_dir)
        zi, zt = clip.encode_images(data["images"]), clip.encode_texts(data["captions"])
        report[split] = {"retrieval": retrieval(zi, zt, data), "modality_gap": modality_gap(zi, zt)}
        if not uses_folder(preset):
            report[split] = {"zero_shot": zero_shot(clip, zi, data["attributes"]), **report[split]}
    return report


# ---------------------------------------------------------------------------------------------
# Training and the artifact


def _stage_config(preset: Preset) -> dict:
    """What the CLIP artifact depends on: its own config and the data it was trained on."""
    return {"clip": to_dict(preset.clip), **source_config(preset)}


def train_clip(preset: Preset, out_dir: str | Path, progress: bool = True) -> ClipModel:
    """Train CLIP on the preset's train split (ShapesWorld or a caption folder) and save it as the `clip` artifact.

    The artifact's ``model.safetensors`` is a plain open_clip state dict: it loads with
    ``open_clip.create_model(name, pretrained=<path>)`` as well as with `load_clip_stage`.
    """
    cfg, out_dir = preset.clip, Path(out_dir)
    cache = out_dir.parent / "cache"
    data = rendered(dataset(preset, "train"), cfg.n_train_images, cache)
    stage_config = _stage_config(preset)
    seed_everything(cfg.train.seed)
    clip = load_clip(cfg.model, device=cfg.train.device, precision=cfg.train.precision)
    clip.model.visual.to(memory_format=torch.channels_last)  # measured: 1.3-1.5x faster convolutions
    batches = ClipBatches(clip, data, cfg.train.batch_size, cfg.p_partial_caption, cfg.train.seed)
    train_metrics = train(clip.model, clip_loss, batches, cfg.train, run_dir=out_dir, progress=progress,
                          desc="clip", run_config=stage_config)
    clip.model.eval()
    metrics = {"train": train_metrics, "eval": evaluate_clip(clip, preset, cfg.n_eval, cache),
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
    with ckpt.stage_lock(folder, exclusive=False):  # open_clip reads the weights file a second time
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


CACHE_FORMAT = 2  # bump when the cache's tensor names or layout change (2: image_embed / text_embed)


def embedding_cache(clip: ClipModel, dataset, n: int | None = None, cache_dir: str | Path | None = None,
                    states: bool = True) -> dict:
    """A dataset's CLIP embeddings, computed once and stored as an artifact.

    Returns {"image_embed": (N, D), "text_embed": (N, D), "captions", "attributes"} and, with
    `states`, the per-token text states stored once per *distinct* caption (captions repeat):
    "caption_index" (N,) into "text_states" (U, L, width) bf16 and "text_mask" (U, L), with "L"
    trimmed to the longest caption. z_i and z_t are unit-norm float32.

    The cache lives in `cache_dir/clip-<split>-<key>`, keyed by the dataset, n and the CLIP
    weights' fingerprint, so a retrained CLIP never reads stale embeddings. Under torchrun rank 0
    builds it while the other ranks wait, then they read it.
    """
    with main_process_first():
        return _embedding_cache(clip, dataset, n, cache_dir, states)


def _embedding_cache(clip: ClipModel, dataset, n: int | None, cache_dir: str | Path | None, states: bool) -> dict:
    n = len(dataset) if n is None else min(n, len(dataset))
    folder, fingerprint = None, None
    if cache_dir is not None:
        fingerprint = clip.fingerprint()
        runtime = [clip.device.type, clip.precision]  # bf16 and fp32 embeddings differ: never mixed
        key = hashlib.sha1(json.dumps([dataset_key(dataset, n), fingerprint, states, CACHE_FORMAT, runtime]).encode()).hexdigest()[:12]
        folder = Path(cache_dir) / f"clip-{getattr(dataset, 'split', 'folder')}-{key}"
        if (folder / "embeddings.safetensors").exists() and (folder / "samples.json").exists():
            tensors = ckpt.load_tensors(folder / "embeddings.safetensors")
            meta = ckpt.read_json(folder / "samples.json")
            return {**tensors, "captions": meta["captions"], "attributes": meta["attributes"]}
    data = rendered(dataset, n, None if cache_dir is None else Path(cache_dir))
    out = {"image_embed": clip.encode_images(data["images"]), "captions": data["captions"],
           "attributes": data["attributes"]}
    unique = sorted(set(data["captions"]))
    index = {c: k for k, c in enumerate(unique)}
    text = clip.text_states(unique)
    out["text_embed"] = text["embedding"][torch.tensor([index[c] for c in data["captions"]], dtype=torch.long)]
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


