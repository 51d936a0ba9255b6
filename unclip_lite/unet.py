"""An ADM-style U-Net (Dhariwal & Nichol 2021, as used by GLIDE and unCLIP), sized for a CPU.

- ResBlocks apply a scale and shift from the timestep embedding (adaptive GroupNorm);
- attention runs only at low resolution, and there the image tokens attend to themselves *and*
  to a context sequence (the caption's token states, and z_i's extra tokens), GLIDE-style: the
  context's keys and values are concatenated with the image's, in one attention call;
- an optional extra embedding is added to the timestep embedding (z_i's projection);
- extra input channels carry a low-resolution image for the upsampler.

Output convolutions are zero-initialised, so an untrained block is the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import attention_backend


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)  # up to 32 groups, dividing any width


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class AttentionBlock(nn.Module):
    """Self-attention over the image's positions, with the context's keys and values appended."""

    def __init__(self, ch: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.context_kv = nn.Linear(context_dim, 2 * ch) if context_dim else None
        self.out = _zero(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context).chunk(2, dim=-1)
            k, v = torch.cat([k, ck.to(k.dtype)], 1), torch.cat([v, cv.to(v.dtype)], 1)
            if context_mask is not None:  # image positions always attend; padded context tokens never
                keep = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
                mask = torch.cat([keep, context_mask.bool()], 1)[:, None, None, :]
        split = lambda z: z.reshape(b, z.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        if x.device.type == "cpu":
            with attention_backend():
                out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, h * w, c)
        return x + self.out(out).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """x_t (B, in_channels, S, S), t (B,) [, emb (B, emb_dim), context (B, L, context_dim), mask (B, L)]
    -> (B, out_channels, S, S).

    `channel_mults` sets the width at each resolution (S, S/2, ...); `attention_levels` lists the
    levels (0 = full resolution) that get attention blocks, and `mid_attention` whether the middle
    block has one. With `attention_levels=()` and `mid_attention=False` the network is purely
    convolutional (the upsampler: trained on crops, run on full images).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 2), blocks_per_level: int = 2,
                 attention_levels: tuple[int, ...] = (2,), heads: int = 4, context_dim: int | None = None,
                 dropout: float = 0.0, patch_size: int = 1, mid_attention: bool = True):
        super().__init__()
        self.base = base_channels
        self.patch = patch_size
        emb_dim = 4 * base_channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels * patch_size ** 2, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        chans, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(blocks_per_level):
                layer = nn.ModuleList([ResBlock(ch, base_channels * mult, emb_dim, dropout)])
                ch = base_channels * mult
                if level in attention_levels:
                    layer.append(AttentionBlock(ch, heads, context_dim))
                self.down.append(layer)
                chans.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
        mid_attn = [AttentionBlock(ch, heads, context_dim)] if mid_attention else []
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), *mid_attn, ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(blocks_per_level + 1):
                layer = nn.ModuleList([ResBlock(ch + chans.pop(), base_channels * mult, emb_dim, dropout)])
                ch = base_channels * mult
                if level in attention_levels:
                    layer.append(AttentionBlock(ch, heads, context_dim))
                if level > 0 and i == blocks_per_level:
                    layer.append(Upsample(ch))
                self.up.append(layer)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels * patch_size ** 2, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_mlp(timestep_embedding(t, self.base))
        if emb is not None:
            e = e + emb
        if self.patch > 1:  # space-to-depth: the network runs at 1/patch of the resolution
            x = F.pixel_unshuffle(x, self.patch)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            for m in layer:
                h = self._run(m, h, e, context, context_mask)
            skips.append(h)
        for m in self.mid:
            h = self._run(m, h, e, context, context_mask)
        for layer in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for m in layer:
                h = self._run(m, h, e, context, context_mask)
        out = self.out(h)
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out

    @staticmethod
    def _run(m: nn.Module, h, e, context, mask):
        if isinstance(m, ResBlock):
            return m(h, e)
        if isinstance(m, AttentionBlock):
            return m(h, context, mask)
        return m(h)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
