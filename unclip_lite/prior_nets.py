"""The two prior networks: from a caption to a CLIP image embedding z_i (paper §2.2).

CLIP's text embedding z_t is not a stand-in for z_i: the two modalities sit in separate cones of
the sphere (notebook 04's modality gap). The decoder was trained on z_i, so a caption must first
be mapped to a plausible z_i. The paper builds two priors, and so does this module; both are
causal Transformers built from the one `transformer.CausalTransformer`; `prior.py` trains them.

**Diffusion prior** (`DiffusionPrior`). A decoder-only Transformer with a causal mask over the
sequence [caption token states, z_t, timestep embedding, noised z_i, final query token]; the
output at the query token is the unnoised z_i, trained with an MSE loss (objective "x0" of the
shared `GaussianDiffusion`, which the decoder uses too). The caption (its tokens and z_t) is
replaced by a learned null 10% of the time, for classifier-free guidance. Sampling runs
respaced DDIM steps with guidance; with ``best_of=2`` two z_i are drawn per caption and the one
with the higher z_i . z_t is kept.

Normalisation (the issue asks to state it): **per-dimension mean and std**, measured on the
training z_i (and z_t) and stored with the model as buffers, as Karlo does. The paper's single
global scale (17.2 for its CLIP) brings the *average* variance to one, but our 64-dimensional
z_i sit in a narrow cone: their mean is far from zero and their per-dimension spreads differ, so
a global scale leaves the diffusion's signal-to-noise ratio different for every dimension.
``normalisation="global"`` is still available (one scale, no centring) for comparison.

**AR prior** (`ARPrior`). z_i is reduced by PCA to the k components keeping at least 99% of its
variance; each coefficient is quantised uniformly over its training range into `buckets` levels.
A token for the quantised z_i . z_t (equal-mass levels) is placed before them. The Transformer
runs over [caption token states, start, dot token, z_i tokens] and predicts each token from the
ones before it. At sampling the dot token is drawn from the **top half** of its predicted
distribution (the levels at or above the conditional median), which the paper found to raise the
caption match. Sampling uses a key/value cache: one token costs one position's forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ARPriorConfig, PriorConfig
from .transformer import CausalTransformer
from .unet import timestep_embedding  # the same sinusoidal embedding as the U-Net


def embedding_stats(z: torch.Tensor, normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) that map z to roughly unit variance: per dimension, or one global scale.

    "global" is the paper's choice (a single scale, no centring: std = sqrt(mean_j E[z_j^2]),
    which is 1/sqrt(D) for unit vectors); "per_dim" centres and scales every dimension.
    """
    z = z.double()
    if normalisation == "per_dim":
        return z.mean(0).float(), z.std(0).clamp_min(1e-6).float()
    if normalisation == "global":
        scale = z.pow(2).mean().sqrt()
        return torch.zeros(z.shape[1]), torch.full((z.shape[1],), float(scale))
    raise ValueError(f"unknown normalisation {normalisation!r}; choose 'per_dim' or 'global'")


class DiffusionPrior(nn.Module):
    """Predicts the normalised, unnoised z_i from [caption tokens, z_t, t, x_t, query] (§2.2)."""

    def __init__(self, cfg: PriorConfig, z_dim: int, text_width: int, text_length: int):
        super().__init__()
        w = cfg.width
        self.cfg, self.text_length = cfg, text_length
        self.text_proj = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, w))
        self.zt_proj = nn.Linear(z_dim, w)
        self.null_zt = nn.Parameter(torch.randn(w) * 0.02)  # the learned "no caption" in the z_t slot
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.x_proj = nn.Linear(z_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.transformer = CausalTransformer(w, cfg.layers, cfg.heads, text_length + 4)
        self.out = nn.Linear(w, z_dim)
        for name in ("image_mean", "image_std", "text_mean", "text_std"):  # stored with the weights
            self.register_buffer(name, torch.zeros(z_dim) if "mean" in name else torch.ones(z_dim))

    def set_stats(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> None:
        for prefix, z in (("image", image_embed), ("text", text_embed)):
            mean, std = embedding_stats(z, self.cfg.normalisation)
            getattr(self, f"{prefix}_mean").copy_(mean)
            getattr(self, f"{prefix}_std").copy_(std)

    def normalise(self, z_i: torch.Tensor) -> torch.Tensor:
        return (z_i - self.image_mean) / self.image_std

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised samples -> unit-norm z_i (N, D), float32."""
        return F.normalize(x.float() * self.image_std + self.image_mean, dim=-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_embed: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, D) noised normalised z_i; t (B,) float timesteps; text_embed (B, D) unit z_t;
        states (B, L, text_width) caption token states with mask (B, L); drop (B,) bool: replace
        the caption by the null. Returns pred_xstart (B, D), normalised."""
        b = x_t.shape[0]
        tokens = self.text_proj(states)  # (B, L, W)
        zt = self.zt_proj((text_embed - self.text_mean) / self.text_std)  # (B, W)
        keep_text = mask.bool()
        if drop is not None:
            zt = torch.where(drop[:, None], self.null_zt.to(zt.dtype).expand_as(zt), zt)
            keep_text = keep_text & ~drop[:, None]
        dtype = tokens.dtype
        seq = torch.cat([tokens, zt[:, None].to(dtype),
                         self.time_mlp(timestep_embedding(t, self.cfg.width).to(dtype))[:, None].to(dtype),
                         self.x_proj(x_t)[:, None].to(dtype), self.query.to(dtype).expand(b, 1, -1)], 1)
        keep = torch.cat([keep_text, torch.ones(b, 4, dtype=torch.bool, device=x_t.device)], 1)
        return self.out(self.transformer(seq, keep)[:, -1])  # (B, D)


def quantise(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, buckets: int) -> torch.Tensor:
    """Uniform quantisation of coefficients c (..., k) over [lo, hi] per dimension into `buckets`
    levels (long). Values outside the range go to the end levels."""
    u = (c - lo) / (hi - lo)
    return (u * buckets).floor().clamp(0, buckets - 1).long()


def dequantise(tokens: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, buckets: int) -> torch.Tensor:
    """Level centres: the round trip errs by at most (hi - lo) / (2 buckets) inside the range."""
    return lo + (tokens.float() + 0.5) * (hi - lo) / buckets


def quantisation_report(z: torch.Tensor, fit: dict, k: int, buckets: tuple[int, ...]) -> dict:
    """What PCA to k components and quantisation to each number of levels lose, on rows of z:
    the share of variance lost and the mean cosine of the unit-normed reconstruction with z."""
    comps = fit["components"][:k]
    c = (z - fit["mean"]) @ comps.T  # (N, k)
    lo, hi = c.min(0).values, c.max(0).values
    total = float((z - fit["mean"]).pow(2).sum(1).mean())

    def score(coef):
        rec = coef @ comps + fit["mean"]
        return {"variance_lost": float((rec - z).pow(2).sum(1).mean()) / total,
                "cosine": float(F.cosine_similarity(F.normalize(rec, dim=-1), z).mean())}
    out = {"pca_only": score(c)}
    for b in buckets:
        out[b] = score(dequantise(quantise(c, lo, hi, b), lo, hi, b))
    return out


class ARPrior(nn.Module):
    """A causal Transformer over [caption tokens, start, dot token, z_i tokens] (§2.2)."""

    def __init__(self, cfg: ARPriorConfig, z_dim: int, text_width: int, text_length: int, k: int):
        super().__init__()
        w = cfg.width
        self.cfg, self.text_length, self.k = cfg, text_length, k
        self.text_proj = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, w))
        self.start = nn.Parameter(torch.randn(w) * 0.02)
        self.dot_emb = nn.Embedding(cfg.dot_buckets, w)
        self.z_emb = nn.Embedding(cfg.buckets, w)
        self.transformer = CausalTransformer(w, cfg.layers, cfg.heads, text_length + 1 + k)
        self.dot_head = nn.Linear(w, cfg.dot_buckets)
        self.z_head = nn.Linear(w, cfg.buckets)
        # the PCA, the coefficient ranges and the dot-product level edges, stored with the weights
        self.register_buffer("pca_mean", torch.zeros(z_dim))
        self.register_buffer("pca_components", torch.zeros(k, z_dim))
        self.register_buffer("lo", torch.zeros(k))
        self.register_buffer("hi", torch.ones(k))
        self.register_buffer("dot_edges", torch.zeros(cfg.dot_buckets - 1))

    def set_stats(self, image_embed: torch.Tensor, text_embed: torch.Tensor, fit: dict) -> None:
        self.pca_mean.copy_(fit["mean"])
        self.pca_components.copy_(fit["components"][:self.k])
        c = self.coefficients(image_embed)
        self.lo.copy_(c.min(0).values)
        self.hi.copy_(c.max(0).values)
        dots = (image_embed * text_embed).sum(1).double()
        q = torch.arange(1, self.cfg.dot_buckets, dtype=torch.float64) / self.cfg.dot_buckets
        self.dot_edges.copy_(torch.quantile(dots, q).float())

    def coefficients(self, z_i: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z_i.device.type, enabled=False):  # float32: bf16 would blur the levels
            return (z_i.float() - self.pca_mean) @ self.pca_components.T  # (N, k)

    def tokens(self, z_i: torch.Tensor, text_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dot token (N,), z_i tokens (N, k)) of unit embeddings."""
        dot = torch.bucketize((z_i * text_embed).sum(1).contiguous(), self.dot_edges)
        return dot, quantise(self.coefficients(z_i), self.lo, self.hi, self.cfg.buckets)

    def embeddings(self, z_tokens: torch.Tensor) -> torch.Tensor:
        """z_i tokens (N, k) -> unit-norm z_i (N, D)."""
        c = dequantise(z_tokens, self.lo, self.hi, self.cfg.buckets)
        with torch.autocast(c.device.type, enabled=False):
            return F.normalize(c @ self.pca_components + self.pca_mean, dim=-1)

    def prefix(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.text_proj(states)  # (B, L, W)
        b = tokens.shape[0]
        seq = torch.cat([tokens, self.start.to(tokens.dtype).expand(b, 1, -1)], 1)
        return seq, torch.cat([mask.bool(), torch.ones(b, 1, dtype=torch.bool, device=mask.device)], 1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, dot: torch.Tensor,
                z_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits: dot (B, dot_buckets) read at the start token, and z (B, k, buckets),
        token j read at the token before it."""
        seq, keep = self.prefix(states, mask)
        dtype = seq.dtype
        seq = torch.cat([seq, self.dot_emb(dot)[:, None].to(dtype), self.z_emb(z_tokens[:, :-1]).to(dtype)], 1)
        keep = torch.cat([keep, torch.ones(len(dot), self.k, dtype=torch.bool, device=dot.device)], 1)
        h = self.transformer(seq, keep)[:, self.text_length:]  # (B, 1 + k, W): start, dot, z_1..z_{k-1}
        return self.dot_head(h[:, 0]), self.z_head(h[:, 1:])


def top_half(probs: torch.Tensor) -> torch.Tensor:
    """Keep the levels at or above the distribution's median (rows of (N, levels), ordered by
    value), renormalised: the levels whose mass strictly above them is below one half."""
    above = probs.flip(-1).cumsum(-1).flip(-1) - probs  # mass strictly above each level
    kept = torch.where(above < 0.5, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def draw_level(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one level (B, 1) per row of probs (B, levels), from uniforms u (B,)."""
    cdf = probs.double().cpu().cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)


def best_of_candidates(cands: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """From (n, N, D) draws keep, per caption, the one with the highest z_i . z_t (paper §2.2)."""
    if cands.shape[0] == 1:
        return cands[0]
    best = (cands * z_t[None]).sum(-1).argmax(0)  # (N,)
    return cands[best, torch.arange(cands.shape[1])]
