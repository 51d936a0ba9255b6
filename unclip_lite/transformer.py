"""The causal Transformer both priors are built on (paper §2.2: a decoder-only Transformer over
a sequence of text tokens, embeddings and timesteps), with an incremental key/value cache for
the autoregressive prior's sampling."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import attention_backend


def attention_mask(keep: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) bool, True where query i may read key j: causal (key position <= query
    position) and the key is kept (`keep` (B, K) False for padding and dropped tokens). A query
    may always read itself, so no row is empty."""
    k_pos = torch.arange(keep.shape[1], device=keep.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Q, K)
    own = k_pos[None, :] == q_pos[:, None]
    return (causal[None] & (keep[:, None, :] | own[None]))[:, None]


class Block(nn.Module):
    """A pre-LayerNorm Transformer block: masked self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: dict | None = None) -> torch.Tensor:
        """x (B, S, W); mask (B, 1, S, K) from `attention_mask`; `past` {"k", "v"} (B, H, K-S, W/H)
        holds the earlier positions' keys and values and is extended in place."""
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            if "k" in past:
                k, v = torch.cat([past["k"], k], 2), torch.cat([past["v"], v], 2)
            past["k"], past["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, W/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Learned positions, `layers` causal blocks and a final LayerNorm: (B, S, W) -> (B, S, W).

    With `cache` (a dict, empty at first) the call is incremental: `x` holds the next positions
    only, and the cache keeps every layer's keys and values and the keep mask so far.
    """

    def __init__(self, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        start = 0
        if cache is not None:
            start = cache["keep"].shape[1] if "keep" in cache else 0
            keep = torch.cat([cache["keep"], keep], 1) if "keep" in cache else keep
            cache["keep"] = keep
            cache.setdefault("layers", [{} for _ in self.blocks])
        q_pos = torch.arange(start, start + x.shape[1], device=x.device)
        x = x + self.pos[q_pos].to(x.dtype)
        mask = attention_mask(keep, q_pos)
        ctx = attention_backend() if x.device.type == "cpu" else contextlib.nullcontext()
        with ctx:
            for i, block in enumerate(self.blocks):
                x = block(x, mask, cache["layers"][i] if cache is not None else None)
        return self.ln(x)
