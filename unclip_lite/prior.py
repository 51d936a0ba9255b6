"""The prior stage: data, losses, training, sampling and the metrics of the two prior networks
of `prior_nets` (a diffusion prior and an autoregressive prior, paper §2.2), from a caption to a
CLIP image embedding z_i."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .clip import caption_ids, caption_keys, embedding_cache, scene_keys
from .clip_model import ClipModel
from .config import ARPriorConfig, Preset, PriorConfig, from_dict, to_dict
from .data import dataset, eval_splits, rendered, source_config
from .diffusion import GaussianDiffusion, guided
from .prior_nets import ARPrior, DiffusionPrior, best_of_candidates, draw_level, quantisation_report, top_half
from .runtime import autocast, seed_everything
from .stage import TrainedModel, ensure_stage
from .stats import components_for, pca
from .shapes import match_matrix
from .train import clear_state, train, unwrap

KINDS = ("diffusion", "ar")


# ---------------------------------------------------------------------------------------------
# The shared Transformer


# ---------------------------------------------------------------------------------------------
# Normalisation


# ---------------------------------------------------------------------------------------------
# The diffusion prior


def make_diffusion(cfg: PriorConfig) -> GaussianDiffusion:
    """The prior's diffusion: objective "x0" (the paper predicts z_i directly), no clipping (the
    normalised embeddings are not bounded by 1)."""
    return GaussianDiffusion.from_schedule(cfg.schedule, 1000, "x0", clip_x_start=None)


class PriorBatches:
    """`get_batch(step)`: cached z_i, z_t and caption token states, plus (for the diffusion
    prior) the timestep, noise and caption-dropout draws; a pure function of the step."""

    def __init__(self, cache: dict, batch_size: int, seed: int, p_drop_text: float = 0.0, diffusion: bool = True):
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.p_drop_text, self.diffusion = p_drop_text, diffusion

    def __call__(self, step: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        b, c = self.batch_size, self.cache
        idx = torch.randint(len(c["image_embed"]), (b,), generator=g)
        rows = c["caption_index"][idx]
        batch = {"image_embed": c["image_embed"][idx], "text_embed": c["text_embed"][idx],
                 "states": c["text_states"][rows].float(), "mask": c["text_mask"][rows]}
        if self.diffusion:
            batch.update(t=torch.randint(0, 1000, (b,), generator=g),
                         noise=torch.randn(batch["image_embed"].shape, generator=g),
                         drop=torch.rand(b, generator=g) < self.p_drop_text)
        return batch


def diffusion_prior_loss(diffusion: GaussianDiffusion):
    def loss_fn(model: DiffusionPrior, batch: dict) -> torch.Tensor:
        def fn(x, t):
            return model(x, t, batch["text_embed"], batch["states"], batch["mask"], batch["drop"])
        x_start = unwrap(model).normalise(batch["image_embed"])
        return diffusion.training_loss(fn, x_start, batch["t"], batch["noise"]).mean()
    return loss_fn


# ---------------------------------------------------------------------------------------------
# The AR prior: PCA and quantisation


def ar_prior_loss(model: ARPrior, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy over the k + 1 tokens (dot, then z_i), averaged per token."""
    dot, z_tokens = unwrap(model).tokens(batch["image_embed"], batch["text_embed"])
    dot_logits, z_logits = model(batch["states"], batch["mask"], dot, z_tokens)
    dot_loss = F.cross_entropy(dot_logits.float(), dot)
    z_loss = F.cross_entropy(z_logits.float().flatten(0, 1), z_tokens.flatten())
    k = z_tokens.shape[1]
    return (dot_loss + k * z_loss) / (k + 1), {"dot_loss": dot_loss.detach(), "z_loss": z_loss.detach()}


# ---------------------------------------------------------------------------------------------
# Sampling


class TrainedPrior(TrainedModel):
    """A trained prior (either kind) with the CLIP model it reads captions with.

    `sample(captions)` returns unit-norm z_i (N, D), deterministic for a seed.
    """

    def __init__(self, model: nn.Module, kind: str, clip: ClipModel | None, text_length: int,
                 device: str = "auto", precision: str = "auto", metrics: dict | None = None):
        super().__init__(model, device, precision, metrics)
        self.kind, self.clip, self.text_length = kind, clip, text_length
        self.cfg = model.cfg
        if kind == "diffusion":
            self.diffusion = make_diffusion(self.cfg)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t (N, D), token states (N, L, width), mask (N, L)) at the prior's caption length."""
        if self.clip is None:
            raise RuntimeError("this prior was loaded without its CLIP model; pass clip= to load_prior")
        out = self.clip.text_states(list(captions))  # states at CLIP's full context length
        return out["embedding"], out["states"][:, :self.text_length], out["mask"][:, :self.text_length]

    def sample(self, captions: list[str], guidance_scale: float | None = None, steps: int | None = None,
               seed: int = 0, best_of: int | None = None, batch_size: int = 512) -> torch.Tensor:
        """Unit-norm z_i (N, D) for captions. `guidance_scale` and `steps` apply to the diffusion prior
        (defaults from its config) and are ignored by the AR prior; `best_of` draws that many per
        caption and keeps the highest z_i . z_t (default from the config)."""
        z_t, states, mask = self.encode(captions)
        cands = self.candidates(z_t, states, mask, best_of or self.cfg.best_of, guidance_scale, steps, seed, batch_size)
        return best_of_candidates(cands, z_t)

    @torch.no_grad()
    def candidates(self, z_t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, n: int,
                   guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                   batch_size: int = 512, top_half: bool | None = None) -> torch.Tensor:
        """n independent draws per caption, (n, N, D) unit norm. Draw j is the same whatever n is,
        so best-of-1 is the first draw of best-of-2."""
        out = []
        for j in range(n):
            g = torch.Generator().manual_seed(seed * 7919 + j)
            if self.kind == "diffusion":
                noise = torch.randn(len(z_t), z_t.shape[1], generator=g)
                draws = [self._diffuse(z_t[i:i + batch_size], states[i:i + batch_size], mask[i:i + batch_size],
                                       noise[i:i + batch_size], guidance_scale, steps, g)
                         for i in range(0, len(z_t), batch_size)]
            else:  # uniforms drawn up front, so a row's tokens do not depend on the batching
                th = self.cfg.top_half if top_half is None else top_half
                u = torch.rand(len(z_t), self.model.k + 1, generator=g, dtype=torch.float64)
                draws = [self._autoregress(states[i:i + batch_size], mask[i:i + batch_size], u[i:i + batch_size], th)
                         for i in range(0, len(z_t), batch_size)]
            out.append(torch.cat(draws) if draws else torch.empty(0, z_t.shape[1]))
        return torch.stack(out)

    def _diffuse(self, z_t, states, mask, noise, guidance_scale, steps, g) -> torch.Tensor:
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        diffusion = self.diffusion.respaced(steps or self.cfg.sample_steps)
        z_t, states, mask = z_t.to(self.device), states.to(self.device), mask.to(self.device)

        def raw(x, t, drop):
            n = x.shape[0] // z_t.shape[0]  # guided() doubles the batch
            with autocast(self.device, self.precision):
                out = self.model(x, t, z_t.repeat(n, 1), states.repeat(n, 1, 1), mask.repeat(n, 1), drop)
            return out.float()
        x = diffusion.sample(guided(raw, guidance_scale), noise, eta=0.0, generator=g, device=self.device)
        return self.model.unnormalise(x).cpu()

    def _autoregress(self, states, mask, u, use_top_half: bool) -> torch.Tensor:
        model = self.model
        states, mask = states.to(self.device), mask.to(self.device)
        b, cache = len(states), {}
        ones = torch.ones(b, 1, dtype=torch.bool, device=self.device)
        with autocast(self.device, self.precision):
            seq, keep = model.prefix(states, mask)
            h = model.transformer(seq, keep, cache)[:, -1]
            probs = model.dot_head(h).float().softmax(-1)
            if use_top_half:
                probs = top_half(probs)
            token = draw_level(probs, u[:, 0]).to(self.device)  # (B, 1)
            h = model.transformer(model.dot_emb(token).to(seq.dtype), ones, cache)[:, -1]
            z_tokens = []
            for j in range(model.k):
                probs = model.z_head(h).float().softmax(-1)
                token = draw_level(probs, u[:, j + 1]).to(self.device)
                z_tokens.append(token)
                if j + 1 < model.k:
                    h = model.transformer(model.z_emb(token).to(seq.dtype), ones, cache)[:, -1]
        return model.embeddings(torch.cat(z_tokens, 1)).cpu()


def flops_per_sample(trained: TrainedPrior, best_of: int | None = None) -> int:
    """FLOPs the prior network spends on one caption's z_i (all steps, guidance and best-of
    included; CLIP's text encoding excluded), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    z_t, states, mask = trained.encode(["a red circle"])
    with FlopCounterMode(display=False) as counter:
        trained.candidates(z_t, states, mask, best_of or trained.cfg.best_of)
    return int(counter.get_total_flops())


def train_flops_per_sample(model: nn.Module, loss_fn, batch: dict) -> int:
    """FLOPs of one training sample's forward and backward pass (a batch of 2, halved)."""
    from torch.utils.flop_counter import FlopCounterMode
    small = {k: v[:2] for k, v in batch.items()}
    model.train()
    with FlopCounterMode(display=False) as counter:
        out = loss_fn(model, small)
        (out[0] if isinstance(out, tuple) else out).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return int(counter.get_total_flops()) // 2


# ---------------------------------------------------------------------------------------------
# Metrics


def caption_match(captions: list[str], pool_attributes: list[dict], pool_captions: list[str] | None = None) -> np.ndarray:
    """(captions, pool) bool: which pool images each caption describes. ShapesWorld: every
    attribute the caption names (`shapes.caption_matches`, vectorised); a caption folder (no
    ShapesWorld attributes): the image's own caption is the same text."""
    pool = {"attributes": pool_attributes, "captions": pool_captions or [""] * len(pool_attributes)}
    return np.asarray(match_matrix(caption_keys(captions, caption_ids(pool)), scene_keys(pool)))


def nearest_hits(z: torch.Tensor, captions: list[str], pool_z: torch.Tensor, pool_attributes: list[dict],
                 pool_captions: list[str] | None = None) -> torch.Tensor:
    """(N,) bool: does the real image nearest to each z (cosine, among the pool) show what its
    caption says (`caption_match`)?"""
    nearest = (z @ pool_z.T).argmax(1)
    match = caption_match(captions, pool_attributes, pool_captions)
    return torch.from_numpy(match[np.arange(len(captions)), nearest.numpy()])


def pairwise_distance(z: torch.Tensor) -> float:
    """Mean cosine distance 1 - cos over distinct pairs of rows: 0 when every row is the same."""
    sim = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T
    n = len(z)
    return float((1 - sim).sum() / (n * (n - 1))) if n > 1 else 0.0


def eval_pool(clip: ClipModel, preset: Preset, n_pool: int, cache_dir: Path | None) -> dict:
    """Val and held-out scenes (a caption folder: its val images) with their CLIP image
    embeddings: the nearest-image pool."""
    out, splits = {}, eval_splits(preset)
    for split in splits:
        data = rendered(dataset(preset, split), n_pool, cache_dir)
        out[split] = {**data, "image_embed": clip.encode_images(data["images"])}
    out["z"] = torch.cat([out[s]["image_embed"] for s in splits])
    out["attributes"] = [a for s in splits for a in out[s]["attributes"]]
    out["captions"] = [c for s in splits for c in out[s]["captions"]]
    return out


def _round(values: torch.Tensor, digits: int = 4) -> list:
    return [round(float(v), digits) for v in values] if values.dtype.is_floating_point else [bool(v) for v in values]


def evaluate_prior(trained: TrainedPrior, preset: Preset, cache_dir: Path | None, n_diversity: int = 8,
                   per_caption: int = 16) -> dict:
    """The issue's metrics on val and held-out captions (per-caption values kept for bootstraps).

    For each split: "cosine" cos(sampled z_i, the caption's own z_i); "nearest_hit" whether the
    real image nearest to the sample has the caption's attributes; both for best-of-1 and the
    configured best-of (diffusion) or with and without the top-half dot token (AR); the same for
    z_t used as z_i (the baseline the prior must beat on cosine); "diversity": mean pairwise
    cosine distance of `per_caption` samples of one caption, averaged over `n_diversity` captions,
    next to the same for real images that caption describes.
    """
    cfg, clip = trained.cfg, trained.clip
    pool = eval_pool(clip, preset, cfg.n_pool, cache_dir)
    out = {}
    t0 = time.perf_counter()
    for split in eval_splits(preset):
        data = pool[split]
        n = min(cfg.n_eval, len(data["captions"]))
        captions, truth = data["captions"][:n], data["image_embed"][:n]
        z_t, states, mask = trained.encode(captions)
        res = {"n": n, "baseline_text_embed": {
            "cosine": _round(F.cosine_similarity(z_t, truth)),
            "nearest_hit": _round(nearest_hits(z_t, captions, pool["z"], pool["attributes"], pool["captions"]))}}
        if trained.kind == "diffusion":
            cands = trained.candidates(z_t, states, mask, max(2, cfg.best_of))
            variants = {"best_of_1": cands[:1], f"best_of_{max(2, cfg.best_of)}": cands}
        else:
            variants = {"top_half": trained.candidates(z_t, states, mask, 1, top_half=True),
                        "full_distribution": trained.candidates(z_t, states, mask, 1, top_half=False)}
        for name, c in variants.items():
            z = best_of_candidates(c, z_t)
            res[name] = {"cosine": _round(F.cosine_similarity(z, truth)),
                         "nearest_hit": _round(nearest_hits(z, captions, pool["z"], pool["attributes"], pool["captions"]))}
        out[split] = res
    out["sample_s"] = round(time.perf_counter() - t0, 2)
    out["default"] = f"best_of_{cfg.best_of}" if trained.kind == "diffusion" else (
        "top_half" if cfg.top_half else "full_distribution")
    out["diversity"] = diversity(trained, pool, n_diversity, per_caption)
    return out


def diversity(trained: TrainedPrior, pool: dict, n_captions: int, per_caption: int) -> dict:
    """Mean pairwise cosine distance of samples for one caption (averaged over the first
    `n_captions` distinct val captions), next to the real images each caption describes."""
    captions = list(dict.fromkeys(pool["val"]["captions"]))[:n_captions]
    sampled, real = [], []
    match = caption_match(captions, pool["attributes"], pool["captions"])
    for i, caption in enumerate(captions):
        z = trained.sample([caption] * per_caption, seed=i)
        sampled.append(pairwise_distance(z))
        hits = np.nonzero(match[i])[0][:per_caption]
        if len(hits) > 1:
            real.append(pairwise_distance(pool["z"][hits]))
    return {"sampled": round(float(np.mean(sampled)), 4), "real": round(float(np.mean(real)), 4) if real else None,
            "captions": captions, "per_caption": per_caption}


# ---------------------------------------------------------------------------------------------
# The artifacts


def _cfg(preset: Preset, kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown prior kind {kind!r}; choose one of {KINDS}")
    return preset.prior if kind == "diffusion" else preset.ar_prior


def _stage_config(preset: Preset, clip: ClipModel, kind: str) -> dict:
    return {"prior": to_dict(_cfg(preset, kind)), "kind": kind, **source_config(preset),
            "clip_fingerprint": clip.fingerprint()}


def _build(kind: str, cfg, z_dim: int, text_width: int, text_length: int, k: int | None = None) -> nn.Module:
    if kind == "diffusion":
        return DiffusionPrior(cfg, z_dim, text_width, text_length)
    return ARPrior(cfg, z_dim, text_width, text_length, k)


def train_prior(preset: Preset, clip: ClipModel, out_dir: str | Path, kind: str = "diffusion",
                progress: bool = True) -> TrainedPrior:
    """Train a prior on the CLIP embedding cache of the preset's train split, measure it, save it."""
    cfg, out_dir = _cfg(preset, kind), Path(out_dir)
    cache_dir = out_dir.parent / "cache"
    cache = embedding_cache(clip, dataset(preset, "train"), cfg.n_train_images, cache_dir)
    text_length = int(cache["text_mask"].shape[1])
    stage_config = _stage_config(preset, clip, kind)
    seed_everything(cfg.train.seed)
    extra, k = {}, None
    if kind == "diffusion":
        model = DiffusionPrior(cfg, clip.embed_dim, clip.width, text_length)
        model.set_stats(cache["image_embed"], cache["text_embed"])
        loss_fn = diffusion_prior_loss(make_diffusion(cfg))
        batches = PriorBatches(cache, cfg.train.batch_size, cfg.train.seed, cfg.p_drop_text)
    else:
        fit = {key: v.float() for key, v in pca(cache["image_embed"]).items()}
        k = components_for(fit["explained"], cfg.variance_kept)
        model = ARPrior(cfg, clip.embed_dim, clip.width, text_length, k)
        model.set_stats(cache["image_embed"], cache["text_embed"], fit)
        loss_fn = ar_prior_loss
        batches = PriorBatches(cache, cfg.train.batch_size, cfg.train.seed, diffusion=False)
        extra = {"k": k, "pca_explained": [round(float(e), 6) for e in fit["explained"]],
                 "quantisation": {str(key): v for key, v in quantisation_report(
                     cache["image_embed"], fit, k, (8, 16, 32, 64, 128, 256, 1024)).items()}}
    train_metrics = train(model, loss_fn, batches, cfg.train, run_dir=out_dir, progress=progress,
                          desc=f"{kind} prior", run_config=stage_config)
    model.cpu()
    train_flops = train_flops_per_sample(model, loss_fn, batches(0))
    trained = TrainedPrior(model, kind, clip, text_length, device=cfg.train.device)
    metrics = {"train": train_metrics, "n_params": sum(p.numel() for p in model.parameters()),
               "train_flops_per_sample": train_flops,
               "train_flops": train_flops * cfg.train.steps * cfg.train.batch_size,
               "flops_per_sample": flops_per_sample(trained), **extra,
               "eval": evaluate_prior(trained, preset, cache_dir)}
    ckpt.save_stage(out_dir, f"prior_{kind}", model.state_dict(), stage_config, metrics,
                    extra={"kind": kind, "z_dim": clip.embed_dim, "text_width": clip.width,
                           "text_length": text_length, "k": k})
    clear_state(out_dir)
    trained.metrics = ckpt.read_json(out_dir / ckpt.METRICS)
    return trained


def load_prior(folder: str | Path, preset: Preset | None = None, clip: ClipModel | None = None,
               kind: str = "diffusion") -> TrainedPrior:
    """Load a prior artifact; with `preset` and `clip`, its config and CLIP fingerprint must match.
    Without `clip`, sampling needs encoded captions (`candidates`)."""
    expected = _stage_config(preset, clip, kind) if preset is not None and clip is not None else None
    state, meta, metrics = ckpt.load_stage(folder, f"prior_{kind}", expected)
    cfg = from_dict(PriorConfig if kind == "diffusion" else ARPriorConfig, meta["config"]["prior"])
    model = _build(kind, cfg, meta["z_dim"], meta["text_width"], meta["text_length"], meta["k"])
    model.load_state_dict(state)
    return TrainedPrior(model, kind, clip, meta["text_length"], device=cfg.train.device, metrics=metrics)


def ensure_prior(artifacts_dir: str | Path, preset: Preset, clip: ClipModel, kind: str = "diffusion",
                 retrain: bool = False, progress: bool = True) -> TrainedPrior:
    """Load the prior (`prior_diffusion` or `prior_ar`), training it if missing or stale."""
    _cfg(preset, kind)
    folder = Path(artifacts_dir) / f"prior_{kind}"
    return ensure_stage(folder, f"{kind} prior", lambda: load_prior(folder, preset, clip, kind),
                        lambda: train_prior(preset, clip, folder, kind, progress), retrain)


# ---------------------------------------------------------------------------------------------
# The comparison (notebook 07)


