"""CLIP as a model: open_clip architectures of our own (JSON configs in ``model_configs``,
registered with open_clip so ``open_clip.create_model("shapes-clip-32")`` works like any open_clip
model), `load_clip` (ours or real pretrained open_clip weights from a local file, loaded the same
way), and `ClipModel`, which wraps a model with its tokenizer and tensor preprocessing and gives
`encode_images`, `encode_texts` and `text_states` (the per-token states the decoder and prior
attend to). Training it is the CLIP stage's job (`clip.py`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .images import check_images
from .runtime import attention_backend, autocast, resolve_device, resolve_precision

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
        if not hasattr(model, "transformer") or not hasattr(model, "text_projection"):
            raise ValueError(f"open_clip model {name!r} ({type(model).__name__}) has no CLIP-style text tower "
                             "(`transformer` and `text_projection`): the decoder and priors read its per-token "
                             "states, so unclip_lite supports open_clip's CLIP models, not SigLIP/CoCa-style ones")
        self.embed_dim = int(model.text_projection.shape[1]) if model.text_projection is not None else None
        self.context_length = int(model.context_length)
        self.width = int(model.transformer.width)

    def fingerprint(self) -> str:
        """Identifies the weights in memory now (`checkpoint.fingerprint`): equal to the stage
        file's hash for a model loaded from (or just saved to) a stage folder, and different
        once the weights change, whatever another process has since written to that folder.
        Later stages record it and check it on load; embedding caches are keyed by it.
        Remembered until a tensor changes in place (torch bumps its `_version` on every
        in-place write, optimiser steps and `load_state_dict` included)."""
        state = self.model.state_dict()
        versions = tuple((k, id(v.untyped_storage()), v._version) for k, v in state.items())
        if getattr(self, "_fingerprint_of", (None,))[0] != versions:
            self._fingerprint_of = (versions, ckpt.fingerprint(state_dict=state))
        return self._fingerprint_of[1]

    # -- inputs --------------------------------------------------------------------------------
    def prepare(self, images) -> torch.Tensor:
        """Images (see the class docstring) -> the model's normalised float input."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        check_images(images)
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
