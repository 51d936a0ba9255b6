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
from .data import rendered, require_shapesworld, uses_folder
from .images import DEGRADATIONS, degrade, to_float, to_uint8
from .runtime import autocast, seed_everything
from .stage import TrainedModel, ensure_stage
from .shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, ShapesWorld, parse_caption
from .train import clear_state, train

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
        x = to_float(images) if images.dtype == torch.uint8 else images.float()
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
    def outputs(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Every head's logits and the penultimate features for (N, 3, 32, 32) images."""
        outs = []
        for i in range(0, len(images), batch_size):
            x = Judge.prepare(images[i:i + batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                o = self.model(x)
            outs.append({k: v.float().cpu() for k, v in o.items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def predict(self, images: torch.Tensor) -> list[dict]:
        """Predicted attributes per image, in the same form as a scene's attribute dict."""
        out = self.outputs(images)
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
        return self.outputs(images)["features"]

    def attribute_accuracy(self, images: torch.Tensor, attributes: list[dict]) -> dict[str, float]:
        """Per-attribute accuracy over the images whose attributes name it, and "joint": the
        share of images with every named shape, colour and size (of both objects) right."""
        return attribute_accuracy(images, attributes, self)


def attribute_hits(images: torch.Tensor, attributes: list[dict], judge: TrainedJudge) -> dict[str, torch.Tensor]:
    """Per image and head: {head: (N,) bool right, head + "_named": (N,) bool scored}, and "joint":
    (N,) bool, every named shape, colour and size (of either object) right at once."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    out = judge.outputs(images)
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


def readings(judge: TrainedJudge, images: torch.Tensor) -> list[str]:
    """What the judge reads in each image, as a short phrase: "small red star", two objects joined
    by " + " (for titles under generated images, beside what the caption asked for)."""
    return [" + ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in p["objects"]) for p in judge.predict(images)]


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


# ---------------------------------------------------------------------------------------------
# Training and the cached artifact


def _judge_batches(data: dict, cfg: JudgeConfig):
    # downsample once to the judge's resolution (uint8 keeps the cache small), not every step
    images = torch.cat([to_uint8(Judge.prepare(data["images"][i:i + 4096]))
                        for i in range(0, len(data["images"]), 4096)])
    labels = encode_labels(data["attributes"])

    def get_batch(step: int) -> dict:
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (cfg.train.batch_size,), generator=g)
        x = to_float(images[idx])  # (B, 3, 32, 32)
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
    return {"judge": to_dict(preset.judge), "world": to_dict(preset.world)}  # ShapesWorld only (ensure_judge refuses a folder)


def load_judge(folder: str | Path, preset: Preset | None = None) -> TrainedJudge:
    """Load a judge artifact; with `preset`, its stored config must match the preset's."""
    state, meta, metrics = ckpt.load_stage(folder, "judge", _stage_config(preset) if preset else None)
    cfg = from_dict(JudgeConfig, meta["config"]["judge"])
    model = Judge(cfg.width, cfg.feature_dim)
    model.load_state_dict(state)
    return TrainedJudge(model, metrics, device=cfg.train.device)


def judge_if_shapesworld(artifacts_dir: str | Path, preset: Preset, progress: bool = True) -> TrainedJudge | None:
    """`ensure_judge` for a stage that measures itself with the judge when there is one: None when
    the preset's data is a caption folder (the judge reads ShapesWorld only)."""
    return None if uses_folder(preset) else ensure_judge(artifacts_dir, preset, progress=progress)


def ensure_judge(artifacts_dir: str | Path, preset: Preset, retrain: bool = False,
                 progress: bool = True) -> TrainedJudge:
    """Load the judge from `artifacts_dir/judge`, training it first if it is missing.

    A stored judge made with another config (or `retrain=True`) is moved aside to
    `judge.stale-<time>` and a new one is trained: nothing saved is lost, and the message says
    which fields differed. Use `load_judge` to load strictly. The judge reads ShapesWorld's
    attributes: a preset whose data is a caption folder gets `data.NeedsShapesWorld`.
    """
    require_shapesworld(preset, "the judge")
    folder = Path(artifacts_dir) / "judge"
    return ensure_stage(folder, "judge", lambda: load_judge(folder, preset),
                        lambda: train_judge(preset, folder, progress=progress), retrain)


# ---------------------------------------------------------------------------------------------
# Uncertainty


# ---------------------------------------------------------------------------------------------
# The paper's comparisons (notebook 12). Every number is the judge's reading of generated images;
# each comes with per-caption (or per-image) values so that intervals can be bootstrapped, and a
# difference between two systems is always paired: the same captions, the same seeds.


