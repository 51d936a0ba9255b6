"""Measuring images: the judge, attribute accuracy and the Fréchet distance.

The judge is a small CNN trained on ShapesWorld to read every attribute of a scene: the first
object's shape, colour and size, the background, the object count, the second object's shape,
colour and size when there is one, and the first object's position. It is trained with blur,
noise and low-resolution round trips so that it also reads generated images, which are never
pixel-perfect. Later stages are scored with it, never with their own models. Its penultimate
features stand in for Inception's in a Fréchet distance (no Inception weights can be downloaded
here).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import JudgeConfig, Preset, WorldConfig, from_dict, to_dict
from .data import rendered
from .runtime import TrainedModel, autocast, seed_everything
from .shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, ShapesWorld, parse_caption
from .train import clear_state, ensure_stage, train

# Classification heads: name -> (vocabulary, where in the attributes to read it)
HEADS = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "background": BACKGROUNDS,
    "count": ("1", "2"), "shape2": SHAPES, "colour2": tuple(COLOURS), "size2": tuple(SIZES),
}
PRIMARY_HEADS = ("shape", "colour", "size", "background", "count")  # the judge's accuracy target
IGNORE = -100


def _label(attrs: dict, head: str) -> int:
    """The class index of one head for one attribute dict, IGNORE where it is not named."""
    objs = attrs.get("objects", [])
    if head == "background":
        value = attrs.get("background")
    elif head == "count":
        value = str(attrs["count"]) if "count" in attrs else None
    else:
        slot = 1 if head.endswith("2") else 0
        key = head.rstrip("2")
        value = objs[slot].get(key) if len(objs) > slot else None
    return HEADS[head].index(value) if value is not None else IGNORE


def encode_labels(attributes: list[dict]) -> dict[str, torch.Tensor]:
    """Attribute dicts (full scene attributes or parsed captions) -> label tensors per head.

    Also returns "pos" (N, 2): the first object's (x, y), NaN where unknown (parsed captions).
    """
    out = {h: torch.tensor([_label(a, h) for a in attributes], dtype=torch.long) for h in HEADS}
    pos = [[o.get("x", math.nan), o.get("y", math.nan)] for o in (a.get("objects", [{}])[0] for a in attributes)]
    out["pos"] = torch.tensor(pos, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Degradations (training augmentation, and the "degraded" accuracy report)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 5) -> torch.Tensor:
    """Depthwise Gaussian blur of (N, C, H, W) images."""
    if sigma <= 0:
        return x
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def degrade(x: torch.Tensor, blur: float = 0.0, noise: float = 0.0, down: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """A half-resolution round trip, blur and additive Gaussian noise, on (N, 3, H, W) images in [-1, 1]."""
    if down:
        h = x.shape[-1]
        x = F.interpolate(F.interpolate(x, size=h // 2, mode="area"), size=h, mode="bilinear", align_corners=False)
    x = gaussian_blur(x, blur)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x.clamp(-1, 1)


DEGRADATIONS = {
    "clean": {},
    "blur": {"blur": 0.7},
    "noise": {"noise": 0.1},
    "16px": {"down": True},
    "all": {"blur": 0.5, "noise": 0.06, "down": True},
}


# ---------------------------------------------------------------------------------------------
# The model


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=(k - stride + 1) // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """A small CNN reading ShapesWorld attributes at 32x32, the decoder's resolution (larger
    inputs are downsampled with antialiasing, smaller ones upsampled).

    The features pool the final 8x8 map: global mean and max, plus max over each half (left,
    right, top, bottom). Pooling is translation invariant, which is what makes shape learnable
    in a couple of minutes (a flattened map learned shape 3x slower here); the halves give the
    two objects of a two-object scene separate features. Two coordinate channels enter the last
    convolutions (CoordConv), so the features also know where things are (position regression).
    """

    image_size = 32

    def __init__(self, width: int = 32, feature_dim: int = 256):
        super().__init__()
        c = width
        self.trunk = nn.Sequential(
            _conv(3, c),  # (N, c, 32, 32)
            _conv(c, c),
            _conv(c, 2 * c, stride=2, k=4),  # (N, 2c, 16, 16)
            _conv(2 * c, 2 * c),
            _conv(2 * c, 4 * c, stride=2, k=4),  # (N, 4c, 8, 8)
        )
        self.head_convs = nn.Sequential(_conv(4 * c + 2, 4 * c), _conv(4 * c, 4 * c))
        ramp = torch.linspace(-1, 1, 8)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"))[None], persistent=False)
        self.features = nn.Sequential(nn.Linear(6 * 4 * c, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({h: nn.Linear(feature_dim, len(v)) for h, v in HEADS.items()})
        self.pos = nn.Linear(feature_dim, 2)
        self.to(memory_format=torch.channels_last)  # 15% faster bf16 convolutions on this CPU

    @staticmethod
    def prepare(images) -> torch.Tensor:
        """Images -> float (N, 3, 32, 32) in [-1, 1]. Accepts uint8 (N, 3, H, W) tensors, float
        tensors already in [-1, 1] (the diffusion models' output), and uint8 (N, H, W, 3) arrays
        (ShapesWorld's `Sample.image`, stacked)."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        x = images.float().div(127.5).sub(1) if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != Judge.image_size:
            x = F.interpolate(x, size=Judge.image_size, mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > Judge.image_size)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x.contiguous(memory_format=torch.channels_last))  # (N, 4c, 8, 8)
        h = torch.cat([h, self.coords.to(h.dtype).expand(len(h), -1, -1, -1)], dim=1)  # (N, 4c+2, 8, 8)
        h = self.head_convs(h)  # (N, 4c, 8, 8)
        # global mean and max, then max over the left, right, top and bottom halves: a second
        # object always sits in the other half from the first, so each slot has its own features
        pooled = [h.mean((2, 3)), h.amax((2, 3)), h[..., :4].amax((2, 3)), h[..., 4:].amax((2, 3)),
                  h[..., :4, :].amax((2, 3)), h[..., 4:, :].amax((2, 3))]
        return self.features(torch.cat(pooled, dim=1))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x)
        out = {h: head(f) for h, head in self.heads.items()}
        out["pos"] = self.pos(f)
        out["features"] = f
        return out


# The position regression is secondary: at a larger weight it slowed shape learning several-fold.
# (A rotation regression was dropped for the same reason: 53% shape accuracy against 95% without.)
LOSS_WEIGHTS = {"pos": 1.0}


def judge_loss(model: Judge, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy per head, summed over the samples a head scores and divided by the batch
    size: the second-object heads, which score only two-object scenes, then weigh by their share
    of the batch. (Averaged over their few samples instead, their noisy gradients held shape
    accuracy near 50% after 600 steps.)"""
    out = model(batch["x"])
    n = len(batch["x"])
    losses = {h: F.cross_entropy(out[h].float(), batch[h], ignore_index=IGNORE, reduction="sum") / n
              for h in HEADS}
    loss = sum(losses.values())
    for key, weight in LOSS_WEIGHTS.items():  # regressions, where defined (NaN marks undefined)
        ok = ~torch.isnan(batch[key][:, 0])
        if ok.any():
            loss = loss + weight * F.mse_loss(out[key].float()[ok], batch[key][ok])
    return loss, {k: float(v.detach()) for k, v in losses.items()}


# ---------------------------------------------------------------------------------------------
# Using a trained judge


class TrainedJudge(TrainedModel):
    """A trained judge with the measuring functions later stages use."""

    def __init__(self, model: Judge, metrics: dict | None = None, device: str = "auto", precision: str = "auto"):
        super().__init__(model, device, precision, metrics)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        outs = []
        for i in range(0, len(images), batch_size):
            x = Judge.prepare(images[i:i + batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                o = self.model(x)
            outs.append({k: v.float().cpu() for k, v in o.items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def predict(self, images: torch.Tensor) -> list[dict]:
        """Predicted attributes per image, in the same form as a scene's attribute dict."""
        out = self._run(images)
        labels = {h: out[h].argmax(-1) for h in HEADS}
        preds = []
        for i in range(len(images)):
            count = int(HEADS["count"][labels["count"][i]])
            objs = [{k: HEADS[k][labels[k][i]] for k in ("shape", "colour", "size")}]
            objs[0]["x"], objs[0]["y"] = (float(v) for v in out["pos"][i])
            if count == 2:
                objs.append({k: HEADS[k + "2"][labels[k + "2"][i]] for k in ("shape", "colour", "size")})
            preds.append({"count": count, "background": HEADS["background"][labels["background"][i]],
                          "objects": objs, **{k: objs[0][k] for k in ("shape", "colour", "size")}})
        return preds

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim), for Fréchet distances and diversity."""
        return self._run(images)["features"]

    def attribute_accuracy(self, images: torch.Tensor, attributes: list[dict]) -> dict[str, float]:
        """Per-attribute accuracy over the images whose attributes name it, and "joint": the
        share of images with every named shape, colour and size (of both objects) right."""
        return attribute_accuracy(images, attributes, self)


def attribute_hits(images: torch.Tensor, attributes: list[dict], judge: TrainedJudge) -> dict[str, torch.Tensor]:
    """Per image and head: {head: (N,) bool right, head + "_named": (N,) bool scored}, and "joint":
    (N,) bool, every named shape, colour and size (of either object) right at once."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    out = judge._run(images)
    labels = encode_labels(attributes)
    hits, joint = {}, torch.ones(len(images), dtype=torch.bool)
    for h in HEADS:
        named = labels[h] != IGNORE
        right = out[h].argmax(-1) == labels[h]
        hits[h], hits[h + "_named"] = right, named
        if h not in ("background", "count"):
            joint &= right | ~named
    hits["joint"] = joint
    return hits


def caption_hits(images: torch.Tensor, captions: list[str], judge: TrainedJudge) -> dict[str, torch.Tensor]:
    """`attribute_hits` against what each caption names (`shapes.parse_caption`): "joint" is (N,)
    bool, every shape, colour and size the caption names (both objects) read right."""
    return attribute_hits(images, [parse_caption(c) for c in captions], judge)


def attribute_accuracy(images: torch.Tensor, attributes: list[dict], judge: TrainedJudge) -> dict[str, float]:
    """Judge accuracy per attribute; `attributes` may be full scenes or parsed captions.

    Attributes an entry does not name are not scored for it. "joint" counts an image right when
    every named shape, colour and size (of either object) is right at once.
    """
    return accuracy_from_hits(attribute_hits(images, attributes, judge))


def accuracy_from_hits(hits: dict[str, torch.Tensor]) -> dict[str, float]:
    """`attribute_hits` -> accuracy per head (over the images that name it) and "joint"."""
    result = {h: float(hits[h][hits[h + "_named"]].float().mean()) for h in HEADS if hits[h + "_named"].any()}
    result["joint"] = float(hits["joint"].float().mean())
    return result


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
    Tr (S_a S_b)^{1/2} is computed as the sum of square roots of the eigenvalues of
    S_a^{1/2} S_b S_a^{1/2}, which is symmetric PSD (stable, no complex parts).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 rows")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ s_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------
# Training and the cached artifact


def _judge_batches(data: dict, cfg: JudgeConfig):
    # downsample once to the judge's resolution (uint8 keeps the cache small), not every step
    images = torch.cat([Judge.prepare(data["images"][i:i + 4096]).add(1).mul(127.5).round().to(torch.uint8)
                        for i in range(0, len(data["images"]), 4096)])
    labels = encode_labels(data["attributes"])

    def get_batch(step: int) -> dict:
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (cfg.train.batch_size,), generator=g)
        x = images[idx].float().div(127.5).sub(1)  # (B, 3, 32, 32)
        if cfg.augment:  # 3/4 of the batch clean; 1/8 blurred + noisy; 1/8 16px round trip + noise
            h, q = 3 * len(idx) // 4, len(idx) // 8
            sig = float(torch.rand((), generator=g)) * 0.8
            nz = float(torch.rand((), generator=g)) * 0.12
            x[h:h + q] = degrade(x[h:h + q], blur=sig, noise=nz, generator=g)
            x[h + q:] = degrade(x[h + q:], down=True, noise=nz / 2, generator=g)
        return {"x": x, **{k: v[idx] for k, v in labels.items()}}
    return get_batch


def judge_world(world: WorldConfig, p_two_objects: float = 0.5) -> WorldConfig:
    """The world the judge trains on: the same scenes with nothing held out (a ruler must read
    the held-out compositions too; it is the generative stages that never see them), and more
    two-object scenes, where telling the left (upper) object from the other is the hard part."""
    return dataclasses.replace(world, held_out=(), p_two_objects=max(world.p_two_objects, p_two_objects))


def evaluate_judge(judge: TrainedJudge, world: WorldConfig, n: int, cache_dir: Path | None = None) -> dict:
    """Accuracy per attribute on the test and held-out splits, clean and under each degradation."""
    report = {}
    for split in ("test", "heldout"):
        data = rendered(ShapesWorld(split, world), n, cache_dir)
        x = Judge.prepare(data["images"])
        g = torch.Generator().manual_seed(1234)
        report[split] = {name: attribute_accuracy(degrade(x, generator=g, **kw), data["attributes"], judge)
                         for name, kw in DEGRADATIONS.items()}
    return report


def train_judge(preset: Preset, out_dir: str | Path, progress: bool = True) -> TrainedJudge:
    """Train the judge on rendered ShapesWorld scenes and save it as the `judge` artifact."""
    cfg, out_dir = preset.judge, Path(out_dir)
    cache = out_dir.parent / "cache"
    data = rendered(ShapesWorld("train", judge_world(preset.world)), cfg.n_train_images, cache)
    stage_config = _stage_config(preset)
    seed_everything(cfg.train.seed)
    model = Judge(cfg.width, cfg.feature_dim)
    train_metrics = train(model, judge_loss, _judge_batches(data, cfg), cfg.train, run_dir=out_dir,
                          progress=progress, desc="judge", run_config=stage_config)
    judge = TrainedJudge(model, device=cfg.train.device)
    accuracy = evaluate_judge(judge, preset.world, cfg.n_eval_images, cache)
    metrics = {"train": train_metrics, "accuracy": accuracy,
               "n_params": sum(p.numel() for p in model.parameters())}
    ckpt.save_stage(out_dir, "judge", model.state_dict(), stage_config, metrics)
    clear_state(out_dir)
    judge.metrics = ckpt.read_json(out_dir / ckpt.METRICS)
    return judge


def _stage_config(preset: Preset) -> dict:
    """What the judge artifact depends on: its own config and the world it was trained on."""
    return {"judge": to_dict(preset.judge), "world": to_dict(preset.world)}


def load_judge(folder: str | Path, preset: Preset | None = None) -> TrainedJudge:
    """Load a judge artifact; with `preset`, its stored config must match the preset's."""
    state, meta, metrics = ckpt.load_stage(folder, "judge", _stage_config(preset) if preset else None)
    cfg = from_dict(JudgeConfig, meta["config"]["judge"])
    model = Judge(cfg.width, cfg.feature_dim)
    model.load_state_dict(state)
    return TrainedJudge(model, metrics, device=cfg.train.device)


def ensure_judge(artifacts_dir: str | Path, preset: Preset, retrain: bool = False,
                 progress: bool = True) -> TrainedJudge:
    """Load the judge from `artifacts_dir/judge`, training it first if it is missing.

    A stored judge made with another config (or `retrain=True`) is moved aside to
    `judge.stale-<time>` and a new one is trained: nothing saved is lost, and the message says
    which fields differed. Use `load_judge` to load strictly.
    """
    folder = Path(artifacts_dir) / "judge"
    return ensure_stage(folder, "judge", lambda: load_judge(folder, preset),
                        lambda: train_judge(preset, folder, progress=progress), retrain)


# ---------------------------------------------------------------------------------------------
# Uncertainty


def bootstrap_ci(values, stat=np.mean, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): a percentile bootstrap interval of `stat` over per-sample `values`.

    `values` is (N,) (hits as 0/1, cosines, ...) or (N, K) rows resampled together. For a paired
    comparison of two methods on the same samples, pass the per-sample differences: the interval
    of the mean difference excludes 0 only when the data support a difference.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.array([stat(x[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return float(stat(x)), float(low), float(high)


# ---------------------------------------------------------------------------------------------
# The paper's comparisons (notebook 07). Every number is the judge's reading of generated images;
# each comes with per-caption (or per-image) values so that intervals can be bootstrapped, and a
# difference between two systems is always paired: the same captions, the same seeds.


def sample_system(pipe, decoder, captions: list[str], condition: str = "prior", prior: str = "diffusion",
                  guidance: float | None = None, steps: int | None = None, seed: int = 0,
                  use_caption: bool = True) -> torch.Tensor:
    """32 px images from `decoder` for each caption, conditioned on:

    - "prior": z_i sampled by `pipe`'s `prior` (unCLIP);
    - "text": the CLIP text embedding z_t, fed zero-shot in place of z_i (the paper's ablation);
    - "caption": no z_i at all (the learned null): the caption alone. This is how the
      caption-only (GLIDE-like) baseline always runs, and the ablation for the unCLIP decoder.
    The caption also goes to the decoder unless `use_caption=False`. Noise streams follow
    `pipeline.stage_seed`, so the same seed gives every system the same x_T.
    """
    from .pipeline import stage_seed
    if condition == "prior":
        z = pipe.priors[prior].sample(captions, seed=stage_seed(seed, "prior"))
    elif condition == "text":
        z = pipe.clip.encode_texts(captions)
    elif condition == "caption":
        z = None
    else:
        raise ValueError(f"condition must be 'prior', 'text' or 'caption', got {condition!r}")
    return decode_z(pipe, decoder, z, captions, guidance=guidance, steps=steps, seed=seed, use_caption=use_caption)


def decode_z(pipe, decoder, z: torch.Tensor | None, captions: list[str], guidance: float | None = None,
             steps: int | None = None, seed: int = 0, use_caption: bool = True) -> torch.Tensor:
    """Decode given z_i (N, D) (or None) with the captions (or none), from the seed's x_T."""
    from .decoder import IMAGE_SIZE
    from .manipulate import no_caption
    from .pipeline import stage_seed
    n = len(captions)
    states, mask = pipe.caption_states(captions) if use_caption else no_caption(pipe, n)
    g = torch.Generator().manual_seed(stage_seed(seed, "decoder"))
    noise = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return decoder.sample(z, states, mask, steps=steps, guidance=guidance, noise=noise, generator=g)


def diversity(images: torch.Tensor, judge: TrainedJudge, k: int, shapes_named: list[str] | None = None) -> dict:
    """Spread across the k samples of each caption (images grouped as N/k captions x k samples):

    - "feature": mean pairwise distance of the judge's features (everything the judge sees);
    - "position_px": RMS distance of the judged object centres from their mean, in 32 px pixels;
    - "rotation_deg": circular std of the rotation (`manipulate.estimate_rotation`), over the
      captions whose named shape has one (`shapes_named`, per caption), from the samples the
      judge reads as that shape (another shape's angle lives on another period).
    Each is a list with one value per caption (NaN where undefined), for bootstrap intervals.
    """
    from .manipulate import group_spreads
    if len(images) % k:
        raise ValueError(f"{len(images)} images do not split into groups of k = {k}")
    out = judge._run(images)
    feats = out["features"].view(-1, k, out["features"].shape[-1])
    pair = torch.cdist(feats, feats)  # (G, k, k)
    feature = (pair.sum((1, 2)) / (k * (k - 1))).tolist()
    shapes = list(shapes_named) if shapes_named is not None else ["circle"] * len(feats)  # circle: no rotation
    position, rotation = group_spreads(images, judge.predict(images), k, shapes)
    return {"feature": feature, "position_px": position, "rotation_deg": rotation}


def pca_basis(feats: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), the first `dims` principal directions (D, dims)) of features (N, D)."""
    x = feats.double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:dims].T


def frechet_in_basis(feats: torch.Tensor, real: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The Fréchet distance between generated and real judge features, both projected onto a PCA
    basis of the real features: a few hundred samples cannot estimate a 256-dim covariance, but
    they can estimate a 16-dim one."""
    mean, v = basis
    return frechet_distance(((feats.double() - mean) @ v).numpy(), ((real.double() - mean) @ v).numpy())


def frechet_ci(feats: torch.Tensor, real: torch.Tensor, basis, n_boot: int = 200, seed: int = 0,
               k: int = 1) -> tuple[float, float, float]:
    """`frechet_in_basis` with a bootstrap 95% band, resampling groups of k rows (one caption's
    samples) together. The plug-in distance is biased upward at small n and a resample's
    duplicates add to it, so the point can sit below the band: compare systems with
    `paired_frechet`, not with these bands."""
    rng = np.random.default_rng(seed)
    groups = len(feats) // k
    boots = [frechet_in_basis(feats[torch.from_numpy((rng.integers(0, groups, groups)[:, None] * k + np.arange(k)).ravel())],
                              real, basis) for _ in range(n_boot)]
    low, high = np.percentile(boots, [2.5, 97.5])
    return frechet_in_basis(feats, real, basis), float(low), float(high)


def paired_frechet(plus: list[torch.Tensor], minus: list[torch.Tensor], real: torch.Tensor, basis, k: int,
                   n_boot: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Σ FD(plus) − Σ FD(minus) (`frechet_in_basis`) with a paired bootstrap 95% interval.

    Every feature set holds the samples of the same captions in the same order (k rows per
    caption); each bootstrap draw resamples captions once for all sets. The plug-in Fréchet
    distance is biased upward at small n (a resample's duplicates bias it further), but the
    bias is shared by sets of the same size, so the difference is what is worth an interval.
    FD(A) − FD(B) is plus=[A], minus=[B]; a change of changes is plus=[A2, B1], minus=[A1, B2].
    """
    sets = list(plus) + list(minus)
    n = len(sets[0])
    if n % k or any(len(f) != n for f in sets):
        raise ValueError(f"every feature set needs the same number of rows, a multiple of k = {k}")
    groups = n // k

    def value(rows):
        fds = [frechet_in_basis(f[rows], real, basis) for f in sets]
        return sum(fds[:len(plus)]) - sum(fds[len(plus):])

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, groups, groups)
        boots.append(value(torch.from_numpy((pick[:, None] * k + np.arange(k)).ravel())))
    low, high = np.percentile(boots, [2.5, 97.5])
    return value(torch.arange(n)), float(low), float(high)


def system_report(images: torch.Tensor, captions: list[str], judge: TrainedJudge, k: int,
                  real_feats: torch.Tensor | None = None, basis=None) -> dict:
    """Per caption (so that a bootstrap resamples captions, not the correlated samples of one):
    fidelity (the share of its k images with every named shape, colour and size right) and
    diversity (see `diversity`); and, given real features and a basis, the Fréchet distance with
    its interval (and the judge features, for `paired_frechet`).
    `captions` has one entry per image (each caption repeated k times in a row)."""
    from .shapes import parse_caption
    hits = caption_hits(images, captions, judge)
    parsed = [parse_caption(c) for c in captions[::k]]
    named = [p["objects"][0].get("shape") if p.get("count") == 1 else None for p in parsed]
    fidelity = hits["joint"].float()
    out = {"n_images": len(images), "k": k, "fidelity": fidelity.view(-1, k).mean(1).tolist(),
           **{f"diversity_{key}": v for key, v in diversity(images, judge, k, named).items()}}
    for head in ("shape", "colour", "size"):
        m = hits[head + "_named"]
        out[f"accuracy_{head}"] = float(hits[head][m].float().mean()) if m.any() else float("nan")
    if real_feats is not None and basis is not None:
        out["features"] = judge.features(images)
        out["frechet"] = frechet_ci(out["features"], real_feats, basis, k=k)
    return out


def summarise(values) -> tuple[float, float, float]:
    """Mean with a bootstrap 95% interval, NaNs left out (mean, low, high)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return bootstrap_ci(x) if len(x) else (float("nan"),) * 3


MIN_PAIRS = 10  # fewer pairs than this and a bootstrap interval means nothing: no verdict


def paired_difference(a, b) -> tuple[float, float, float]:
    """Mean of a - b over the pairs where both are defined, with a bootstrap 95% interval; NaN
    (no verdict) with fewer than MIN_PAIRS such pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    return bootstrap_ci(a[keep] - b[keep]) if keep.sum() >= MIN_PAIRS else (float("nan"),) * 3


def direction(diff: tuple[float, float, float], expected: str) -> str:
    """Whether a paired difference (mean, low, high) goes the paper's way: "reproduced" when its
    interval excludes zero on the expected side ("+" or "-"), "reversed" when it excludes zero
    on the other, "not resolved" when it contains zero."""
    if expected not in ("+", "-"):
        raise ValueError(f"expected must be '+' or '-', got {expected!r}")
    if np.isnan(diff[0]):
        return "not measured"
    if diff[1] > 0:
        return "reproduced" if expected == "+" else "reversed"
    if diff[2] < 0:
        return "reproduced" if expected == "-" else "reversed"
    return "not resolved"


def binding_report(images: torch.Tensor, captions: list[str], judge: TrainedJudge) -> dict:
    """Attribute binding on two-object captions, read per object by the judge's two slots (it has
    a second shape/colour/size head for the right-hand or lower object).

    Per image: "object1" / "object2" (that object's named shape, colour and size right), "both",
    "colours_bound" (each object's colour right), and "swapped": the two colours read, but on the
    wrong objects (the binding failure itself).
    """
    from .shapes import parse_caption
    parsed = [parse_caption(c) for c in captions]
    if any(p.get("count") != 2 or len(p.get("objects", [])) != 2 for p in parsed):
        raise ValueError("binding_report needs two-object captions ('a red circle left of a blue square')")
    hits = attribute_hits(images, parsed, judge)
    obj = []
    for suffix in ("", "2"):
        ok = torch.ones(len(images), dtype=torch.bool)
        for head in ("shape", "colour", "size"):
            ok &= hits[head + suffix] | ~hits[head + suffix + "_named"]
        obj.append(ok)
    preds = judge.predict(images)
    swapped = []
    for p, c in zip(preds, parsed):
        named = [o.get("colour") for o in c["objects"]]
        read = [o["colour"] for o in p["objects"]] + [None]
        swapped.append(named[0] != named[1] and read[0] == named[1] and read[1] == named[0])
    colours = (hits["colour"] | ~hits["colour_named"]) & (hits["colour2"] | ~hits["colour2_named"])
    return {"object1": obj[0].float().tolist(), "object2": obj[1].float().tolist(),
            "both": (obj[0] & obj[1]).float().tolist(), "colours_bound": colours.float().tolist(),
            "swapped": [float(s) for s in swapped]}


def pca_probe(pipe, decoder, judge, z_train: torch.Tensor, data: dict, ks=(1, 2, 4, 8, 16, 32, 64),
              guidance: float | None = None, steps: int | None = None, seed: int = 0) -> dict:
    """Decode val z_i reconstructed from their first k principal components (paper §4, Fig. 7).

    The PCA is fitted on the training z_i; each reconstruction is renormalised to the unit sphere
    CLIP's embeddings live on. Decoded with no caption (the caption would name the attributes and
    hide what z_i carries). Returns per k the judge's accuracy per attribute and the share of z_i
    variance the first k components explain, and "full": the accuracy with every component
    (decoded once more unless the last k already keeps them all).
    """
    z = pipe.clip.encode_images(data["images"])
    mean, v = pca_basis(z_train, z_train.shape[1])
    var = ((z_train.double() - mean) @ v).var(0)
    explained = (var.cumsum(0) / var.sum()).tolist()
    coords = (z.double() - mean) @ v
    d = v.shape[1]

    def accuracy_at(k: int) -> dict:
        zk = F.normalize((mean + coords[:, :k] @ v[:, :k].T).float(), dim=-1)
        images = decode_z(pipe, decoder, zk, list(data["captions"]), guidance=guidance, steps=steps, seed=seed,
                          use_caption=False)
        return attribute_accuracy(images, data["attributes"], judge)

    ks = sorted({min(int(k), d) for k in ks})
    out = {"ks": ks, "explained": [explained[k - 1] for k in ks], "accuracy": [accuracy_at(k) for k in ks]}
    out["full"] = out["accuracy"][-1] if ks[-1] == d else accuracy_at(d)
    return out


CHANCE = {"background": 1 / 4, "colour": 1 / 8, "size": 1 / 3, "shape": 1 / 6}  # uniform attributes in ShapesWorld


def components_needed(probe: dict, level: float = 0.9, attributes=("background", "colour", "size", "shape")) -> dict:
    """Per attribute, the fewest principal components at which `pca_probe`'s accuracy has come
    `level` of the way from chance to its accuracy with every component ("full" in the probe),
    so that an attribute decoded near chance does not "arrive" at once. None: never, or when
    the full z_i is itself no better than chance."""
    out = {}
    for a in attributes:
        full, chance = probe["full"].get(a, float("nan")), CHANCE[a]
        if not full > chance:
            out[a] = None
            continue
        out[a] = next((k for k, acc in zip(probe["ks"], probe["accuracy"])
                       if (acc.get(a, 0.0) - chance) >= level * (full - chance)), None)
    return out


def coarse_first(needed: dict, coarse=("background", "colour"), fine=("shape", "size")) -> str:
    """The paper's Fig. 7 direction, from `components_needed`: "reproduced" when every coarse
    attribute arrives with fewer components than every fine one, "reversed" when every fine one
    arrives first, "not resolved" otherwise (ties included)."""
    big = 10 ** 9
    c = [needed[a] if needed[a] is not None else big for a in coarse]
    f = [needed[a] if needed[a] is not None else big for a in fine]
    if max(c) < min(f):
        return "reproduced"
    if max(f) < min(c):
        return "reversed"
    return "not resolved"
