"""Dataclass configs for every stage, named presets, and a JSON round-trip.

Presets:
- ``smoke``: the unit tests; every stage trains in seconds and means nothing.
- ``mini``: notebook 13's default on a caption folder of a few thousand images: the whole
  cascade in a few minutes on a 2-core CPU, small enough to learn colours and outlines of icons.
- ``course``: the notebook defaults; minutes on a 2-core CPU.
- ``gpu``: one GPU; larger models, more data and steps.

The course preset is the dataclass defaults below; ``smoke``, ``mini`` and ``gpu`` are JSON files in
``unclip_lite/presets/`` that list only what they change (read by `from_dict`, so a typo in a
field name is an error, not a silent default).

Every artifact stores the config it was made with (``config.json``), so a stage can be rebuilt
from its folder alone and a mismatch is reported field by field (see ``checkpoint.py``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class WorldConfig:
    """ShapesWorld: the procedural data world (see shapes.py)."""

    seed: int = 0  # world seed: the same (seed, split, index) always renders the same bytes
    image_size: int = 64  # output resolution in pixels (square)
    supersample: int = 4  # render at image_size * supersample, then box-downsample (antialiasing)
    p_two_objects: float = 0.2  # probability that a scene holds a second object and a relation
    p_background_in_caption: float = 0.7  # captions mention the background this often
    p_position_in_caption: float = 0.1  # ...and a coarse position ("near the top") this often
    held_out: tuple[str, ...] = ("green star", "purple circle", "orange triangle")  # compositions never in train
    n_train: int = 100_000  # nominal split lengths (scenes are rendered on demand): train
    n_val: int = 2_000  # validation: model selection and the notebooks' figures
    n_test: int = 2_000  # test: the reported numbers
    n_heldout: int = 1_000  # held-out compositions only


@dataclass
class DataConfig:
    """Where every stage's images and captions come from (data.py): ShapesWorld or a caption folder."""

    source: str = "shapesworld"  # "shapesworld", or the path of a caption folder (images + captions.jsonl or .csv)
    val_fraction: float = 0.1  # a folder's share of entries held out as its val split (by a seeded hash of the file name)
    split_seed: int = 0  # seeds that hash: the same folder and seed always give the same split
    allow_symlinks: bool = False  # follow symlinks inside the folder (links that leave it are refused either way)


@dataclass
class TrainConfig:
    """The shared training loop (train.py)."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 64  # samples per step
    lr: float = 1e-3  # peak learning rate (AdamW), after linear warmup
    warmup_steps: int = 50  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    ema_decay: float = 0.999  # EMA of the weights; the EMA weights are what the artifact stores
    ema_start: int = 0  # steps before the EMA starts tracking (it copies the weights until then)
    precision: str = "auto"  # "auto" | "bf16" | "fp32" (see runtime.resolve_precision)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | ...
    checkpoint_every: int = 200  # steps between resumable checkpoints (0: only at the end)
    log_every: int = 10  # steps between loss-history entries
    seed: int = 0  # seeds the model init and the per-step batch sampling

    def __post_init__(self):
        check_train_config(self)


@dataclass
class JudgeConfig:
    """The judge: a small CNN that reads every ShapesWorld attribute off an image (judge.py)."""

    width: int = 24  # channels of the first stage; doubled at each downsampling
    feature_dim: int = 256  # penultimate features (also used for the Fréchet distance)
    n_train_images: int = 40_000  # rendered training scenes (cached as a tensor)
    n_eval_images: int = 2_000  # test scenes for the reported accuracies
    augment: bool = True  # train with blur, noise and low-res round trips so it reads generated images
    train: TrainConfig = field(  # the training loop: about 2 minutes on 2 cores at the course preset
        default_factory=lambda: TrainConfig(steps=1600, batch_size=64, lr=1e-3, warmup_steps=50,
                                            weight_decay=1e-4, ema_decay=0.98, checkpoint_every=300)
    )


@dataclass
class ClipConfig:
    """CLIP: a tiny open_clip model trained contrastively on ShapesWorld (clip.py)."""

    model: str = "shapes-rn-64"  # an open_clip model config name (ours live in unclip_lite/model_configs)
    n_train_images: int = 40_000  # rendered training scenes (cached as a tensor)
    p_partial_caption: float = 0.3  # share of one-object scenes captioned partially ("a red shape")
    n_eval: int = 1_000  # val and held-out scenes for the metrics
    train: TrainConfig = field(  # the training loop: about 3 minutes on 2 cores at the course preset
        default_factory=lambda: TrainConfig(steps=1100, batch_size=128, lr=2e-3, warmup_steps=50,
                                            weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6,
                                            ema_decay=0.99, checkpoint_every=200)
    )


@dataclass
class DecoderConfig:
    """The decoder: a diffusion U-Net from z_i (and the caption) to a 32x32 image (decoder.py)."""

    patch_size: int = 1  # space-to-depth factor: the U-Net runs at 32 / patch_size px (2 at width 48: faster steps, worse shapes per minute)
    base_channels: int = 32  # U-Net width at its top resolution
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # width multipliers at 32, 16, 8 and 4 px
    blocks_per_level: int = 1  # ResBlocks per resolution on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (2, 3)  # levels (0 = the top) with self + cross attention: 8 and 4 px
    heads: int = 4  # attention heads
    context_dim: int = 128  # width of the context tokens (z_i tokens and projected caption states)
    n_z_tokens: int = 4  # z_i is projected into this many extra context tokens
    z_norm: str = "standard"  # "standard": z_i standardised per dimension (train-set mean/std, stored with the model) | "none"
    dropout: float = 0.0  # dropout inside the ResBlocks
    caption_only: bool = False  # True: the GLIDE-like baseline, no z_i (set by ensure_decoder)
    p_drop_z: float = 0.1  # z_i is replaced by a learned null this often (for guidance)
    p_drop_text: float = 0.5  # the caption is dropped this often (the caption-only baseline: p_drop_z, its only condition)
    objective: str = "v"  # "eps" | "x0" | "v": what the U-Net predicts
    schedule: str = "cosine"  # noise schedule over 1000 steps
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (None: plain MSE on the objective)
    t_sampling: str = "uniform"  # training timesteps: "uniform" | "stratified" (one per 1/B of [0, 1000)) | "logsnr" (log-SNR ~ normal)
    t_logsnr: tuple[float, float] = (0.0, 2.0)  # mean and std of the log-SNR when t_sampling == "logsnr"
    n_train_images: int = 40_000  # training scenes: the CLIP embedding cache of the train split
    sample_steps: int = 50  # DDIM steps at sampling time (respaced from 1000)
    guidance_scale: float = 3.0  # classifier-free guidance scale at sampling time (1 = none)
    n_eval: int = 256  # val (and held-out) scenes decoded for the metrics
    compare_steps: tuple[int, ...] = (10, 25, 50)  # DDIM step counts compared in the metrics (DDPM: the largest two); 250 steps: benchmarks/bench_samplers.py
    n_compare: int = 64  # val scenes in that sampler comparison
    # the caption-only baseline trains the first baseline_steps steps of this schedule, and the unCLIP decoder keeps
    # its weights at that step: notebook 12 compares the two at matched training compute
    baseline_steps: int = 1000
    train: TrainConfig = field(  # the training loop: about 6 minutes on 2 cores at the course preset (budget 8)
        default_factory=lambda: TrainConfig(steps=2200, batch_size=32, lr=2e-3, warmup_steps=100,
                                            ema_decay=0.995, checkpoint_every=500)
    )


@dataclass
class UpsamplerConfig:
    """The upsampler: a diffusion U-Net from a 32 px image to a 64 px one, no attention, no caption (upsampler.py)."""

    patch_size: int = 2  # space-to-depth factor: the U-Net runs at 1/patch_size of the image's resolution
    base_channels: int = 32  # U-Net width at its top resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multipliers per level (at 64 px: 32, 16 and 8 px)
    blocks_per_level: int = 1  # ResBlocks per resolution on the way down (one more on the way up)
    dropout: float = 0.0  # dropout inside the ResBlocks
    crop_size: int = 32  # training crops of the 64 px target (paper: 1/4; here 1/2 beat 1/4 by 1.6 dB PSNR at equal compute)
    cond_upsample: str = "bicubic"  # "bicubic" | "nearest": how the 32 px condition is brought to 64 px (measured equal)
    blur_sigma: float = 0.6  # training corruption of the 32 px condition: Gaussian blur (paper: kernel 3, sigma 0.6)
    blur_kernel: int = 3  # ...its kernel size
    p_blur: float = 0.5  # share of training conditions that are blurred
    aug_max: float = 0.3  # noise augmentation: the level (noise std on [-1, 1] images) is drawn in [0, aug_max]
    p_aug: float = 0.5  # share of training conditions that are noise-augmented (the rest get level 0)
    aug_level: float = 0.0  # noise-augmentation level used at sampling time (the model is told it)
    residual_scale: float | None = 5.0  # None: diffuse the image; a number: diffuse (image - bicubic input) * this (+8.6 dB measured)
    objective: str = "v"  # "eps" | "x0" | "v": what the U-Net predicts
    schedule: str = "cosine"  # noise schedule over 1000 steps
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (None: plain MSE on the objective)
    n_train_images: int = 40_000  # rendered train scenes at 64 px (the 32 px inputs are their downsamples)
    sample_steps: int = 8  # DDIM steps at sampling time (respaced from 1000); 4 is best on clean inputs, 8 on blurred
    n_eval: int = 256  # val scenes upsampled for the metrics
    train: TrainConfig = field(  # the training loop: about 3.5 minutes on 2 cores at the course preset
        default_factory=lambda: TrainConfig(steps=2200, batch_size=64, lr=2e-3, warmup_steps=100,
                                            ema_decay=0.995, checkpoint_every=500)
    )


@dataclass
class PriorShared:
    """What both priors share: the causal Transformer's size, the training scenes, the measurement."""

    width: int = 128  # Transformer width
    layers: int = 4  # Transformer blocks
    heads: int = 4  # attention heads
    n_train_images: int = 40_000  # training scenes: the CLIP embedding cache of the train split
    n_eval: int = 500  # val and held-out captions sampled for the metrics
    n_pool: int = 1_000  # val and held-out scenes each in the nearest-image pool


@dataclass
class PriorConfig(PriorShared):
    """The diffusion prior: a causal Transformer from a caption to a CLIP image embedding z_i (prior.py)."""

    normalisation: str = "per_dim"  # "per_dim": (z - mean) / std per dimension, stored with the model | "global": one scale
    p_drop_text: float = 0.1  # the caption (tokens and z_t) is replaced by a learned null this often (for guidance)
    schedule: str = "cosine"  # noise schedule over 1000 steps (the objective is "x0": the paper predicts z_i directly)
    sample_steps: int = 16  # DDIM steps at sampling time (respaced from 1000; the paper: 64)
    guidance_scale: float = 2.0  # classifier-free guidance scale at sampling time (1 = none)
    best_of: int = 2  # draw this many z_i per caption and keep the one with the highest z_i . z_t (the paper: 2)
    train: TrainConfig = field(  # the training loop: at most 3 minutes on 2 cores at the course preset
        default_factory=lambda: TrainConfig(steps=1200, batch_size=256, lr=1e-3, warmup_steps=100,
                                            weight_decay=0.06, betas=(0.9, 0.96), eps=1e-6,
                                            ema_decay=0.995, checkpoint_every=500, log_every=20)
    )


@dataclass
class ARPriorConfig(PriorShared):
    """The autoregressive prior: a causal Transformer over quantised PCA coefficients of z_i (prior.py)."""

    variance_kept: float = 0.99  # PCA keeps the fewest components explaining at least this share of z_i's variance
    buckets: int = 32  # levels per PCA coefficient, uniform over its training range (the paper: 1024); see notebook 07
    dot_buckets: int = 16  # quantisation levels of z_i . z_t, equal-mass over the training distribution
    top_half: bool = True  # at sampling, draw the z_i . z_t token from the top half of its predicted distribution
    best_of: int = 1  # draw this many z_i per caption and keep the highest z_i . z_t (the paper: none for AR)
    train: TrainConfig = field(  # the training loop: at most 3 minutes on 2 cores at the course preset
        default_factory=lambda: TrainConfig(steps=900, batch_size=256, lr=1e-3, warmup_steps=50,
                                            weight_decay=0.04, betas=(0.9, 0.91), eps=1e-8,
                                            ema_decay=0.99, checkpoint_every=200, log_every=20)
    )


@dataclass
class Preset:
    """All stage configs of one named preset."""

    name: str = "course"  # smoke | course | gpu
    data: DataConfig = field(default_factory=DataConfig)  # ShapesWorld (the world below) or a caption folder
    world: WorldConfig = field(default_factory=WorldConfig)  # the data world
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # the ruler
    clip: ClipConfig = field(default_factory=ClipConfig)  # the latent space
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # z_i -> 32 px image
    upsampler: UpsamplerConfig = field(default_factory=UpsamplerConfig)  # 32 px -> 64 px image
    prior: PriorConfig = field(default_factory=PriorConfig)  # caption -> z_i (diffusion)
    ar_prior: ARPriorConfig = field(default_factory=ARPriorConfig)  # caption -> z_i (autoregressive)


PRESET_DIR = Path(__file__).parent / "presets"


def _from_file(name: str) -> typing.Callable[[], Preset]:
    """A preset stored as JSON in unclip_lite/presets/: what it differs in from the course preset.
    A stage's fields it leaves out keep the course values; a `train` section, where given, is a
    whole TrainConfig (its own fields left out take TrainConfig's defaults, not the course's)."""
    def load() -> Preset:
        path = PRESET_DIR / f"{name}.json"
        return from_dict(Preset, json.loads(path.read_text(encoding="utf-8")), where="")
    return load


PRESETS: dict[str, typing.Callable[[], Preset]] = {"smoke": _from_file("smoke"), "mini": _from_file("mini"), "course": Preset,
                                                   "gpu": _from_file("gpu")}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (`smoke`, `course` or `gpu`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# JSON round trip


def to_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse values the loop cannot run with, naming the field (presets, JSON and --set alike)."""
    def bad(field_, allowed):
        raise ValueError(f"train.{field_} = {getattr(cfg, field_)!r}: must be {allowed}")
    for name in ("steps", "batch_size", "log_every"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
            bad(name, "an integer >= 1")
    for name in ("warmup_steps", "checkpoint_every", "ema_start", "seed"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
            bad(name, "an integer >= 0")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        bad("lr", "a finite number > 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        bad("betas", "two numbers in [0, 1)")
    if not 0 <= cfg.ema_decay <= 1:
        bad("ema_decay", "in [0, 1] (1 keeps the initial weights)")
    for name in ("weight_decay", "grad_clip", "min_lr_ratio", "eps"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            bad(name, "a finite number >= 0")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config field {where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"config field {where}: expected {tp.__name__}, got {value!r}")
    return value


POSITIVE_INTS = {"base_channels", "baseline_steps", "best_of", "blocks_per_level", "buckets", "context_dim", "crop_size",
                 "dot_buckets", "feature_dim", "heads", "image_size", "layers", "n_compare", "n_eval", "n_eval_images",
                 "n_heldout", "n_pool", "n_test", "n_train", "n_train_images", "n_val", "patch_size", "sample_steps",
                 "supersample", "width"}  # counts and sizes: at least 1
PROBABILITIES = {"dropout", "variance_kept", "val_fraction"}  # with every p_* field: in [0, 1]
NON_NEGATIVE = {"aug_level", "aug_max", "blur_sigma", "guidance_scale", "min_snr_gamma", "residual_scale"}


def check_ranges(cfg, where: str = "") -> None:
    """Refuse out-of-range fields of any stage config, by name: counts and sizes >= 1, probabilities
    (p_*, dropout, variance_kept) in [0, 1], scales >= 0 (TrainConfig checks its own fields)."""
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, path)
        elif value is None or isinstance(value, (str, bool, tuple, list)):
            continue
        elif f.name in POSITIVE_INTS and not (_is_int(value) and value >= 1):
            raise ValueError(f"config field {path} = {value!r}: must be an integer >= 1")
        elif (f.name.startswith("p_") or f.name in PROBABILITIES) and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"config field {path} = {value!r}: must be a probability in [0, 1]")
        elif f.name in NON_NEGATIVE and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"config field {path} = {value!r}: must be a finite number >= 0")


def from_dict(cls, data: dict, where: str = ""):
    """Rebuild a dataclass config from `to_dict` output; unknown or mistyped fields are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or cls.__name__}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config {where or cls.__name__}: unknown field(s) {unknown}; "
                         f"known fields are {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    out = cls(**kwargs)
    if not where:  # the whole config read: check every field's range once
        check_ranges(out)
    return out


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Field-by-field differences between two config dicts, as 'path: a != b' lines."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, path)
        elif va != vb:
            out.append(f"{path}: {va!r} != {vb!r}")
    return out


def set_field(cfg, path: str, value):
    """A copy of `cfg` with the dotted field `path` (e.g. "decoder.train.steps") set to `value`,
    converted to the field's type (a JSON string is parsed: "[1, 2]" -> (1, 2), "null" -> None)."""
    head, _, rest = path.partition(".")
    fields = {f.name for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ValueError(f"config {type(cfg).__name__} has no field {head!r}; its fields are {sorted(fields)}")
    if rest:
        sub = getattr(cfg, head)
        if not dataclasses.is_dataclass(sub):
            raise ValueError(f"config field {head!r} of {type(cfg).__name__} has no sub-fields (asked for {path!r})")
        return dataclasses.replace(cfg, **{head: set_field(sub, rest, value)})
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain string
    hint = typing.get_type_hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _convert(hint, value, f"{type(cfg).__name__}.{head}")})
