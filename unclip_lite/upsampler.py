"""The upsampler: a diffusion U-Net from a 32x32 image to a 64x64 one (paper §2.1 and App. C, the
64→256 upsampler, at a quarter of its scale).

As in the paper:
- the model sees the low-resolution image, upsampled to the target size and concatenated with
  x_t as extra input channels; no caption and no attention anywhere (the U-Net is purely
  convolutional), so it is trained on random crops and run on full images;
- the low-resolution condition is corrupted during training: Gaussian blur (kernel 3, sigma 0.6)
  and, as in cascaded diffusion (Ho et al. 2021, "conditioning augmentation"), additive Gaussian
  noise whose level is an input of the model (embedded like the timestep and added to the
  timestep embedding), so sampling can choose how much it trusts the input;
- sampling uses few DDIM steps.

One departure, measured: with `residual_scale` set, what is diffused is the residual over the
bicubic upsample of the input, scaled to roughly unit variance, rather than the image itself.
The network then has to add detail instead of first learning to copy the input's colours
exactly, which a plain model trained for a few CPU minutes does badly (see the config).

The same `UNet` and `GaussianDiffusion` as the decoder; the 32 px inputs are made from the 64 px
renders exactly as the decoder's 32 px targets are (`resize_uint8`), so a decoder sample is the
kind of input it was trained on.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Preset, UpsamplerConfig, from_dict, to_dict
from .data import dataset, rendered, source_config
from .diffusion import GaussianDiffusion
from .images import gaussian_blur, psnr, resize_uint8, to_float
from .runtime import autocast, seed_everything
from .stage import TrainedDenoiser, ensure_stage
from .train import clear_state, train
from .unet import UNet, timestep_embedding

LOW_RES, HIGH_RES = 32, 64
UPSAMPLE_MODES = ("bicubic", "nearest")
AUG_SCALE = 1000.0  # the aug level (a noise std, ~0-1) is embedded like a timestep on a 0-1000 scale


def bicubic_upsample(x32: torch.Tensor, size: int = HIGH_RES) -> torch.Tensor:
    """The baseline: bicubic interpolation of (B, 3, h, w) images in [-1, 1] to (B, 3, size, size)."""
    return upsample_condition(x32, "bicubic", size)


def upsample_condition(x: torch.Tensor, mode: str, size: int = HIGH_RES) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, size, size) by `mode` ("bicubic" is clamped to [-1, 1] again)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling mode {mode!r}; choose one of {UPSAMPLE_MODES}")
    if mode == "nearest":
        return F.interpolate(x.float(), size=(size, size), mode="nearest")
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def corrupt(x32: torch.Tensor, blur: torch.Tensor, aug_level: torch.Tensor, cfg: UpsamplerConfig,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """The training corruption of 32 px conditions (B, 3, 32, 32) in [-1, 1]: a Gaussian blur
    (cfg.blur_kernel, cfg.blur_sigma) where `blur` (B,) is True, then additive noise of std
    `aug_level` (B,). Not clamped: the noise is what the model is told about."""
    blurred = gaussian_blur(x32, cfg.blur_sigma, cfg.blur_kernel)
    x = torch.where(blur[:, None, None, None], blurred, x32)
    if noise is None:
        if not bool(aug_level.any()):
            return x  # no noise asked for: draw none (keeps the global random state untouched)
        noise = torch.randn_like(x)
    return x + aug_level.to(x.dtype)[:, None, None, None] * noise


class Upsampler(nn.Module):
    """x_t (B, 3, S, S), t (B,), cond (B, 3, S, S) the upsampled (corrupted) low-res image,
    aug_level (B,) its noise level -> the objective's output (B, 3, S, S), any S the U-Net divides."""

    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(6, 3, cfg.base_channels, tuple(cfg.channel_mults), cfg.blocks_per_level,
                         attention_levels=(), context_dim=None, dropout=cfg.dropout,
                         patch_size=cfg.patch_size, mid_attention=False)
        d = self.unet.emb_dim
        self.aug_emb = nn.Sequential(nn.Linear(cfg.base_channels, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, aug_level: torch.Tensor) -> torch.Tensor:
        emb = self.aug_emb(timestep_embedding(aug_level * AUG_SCALE, self.cfg.base_channels))
        return self.unet(torch.cat([x_t, cond.to(x_t.dtype)], 1), t, emb)


def make_diffusion(cfg: UpsamplerConfig) -> GaussianDiffusion:
    # a residual can exceed [-1, 1] once scaled: only the final image is clipped then
    return GaussianDiffusion.from_schedule(cfg.schedule, 1000, cfg.objective,
                                           clip_x_start=1.0 if cfg.residual_scale is None else None)


def to_target(x64: torch.Tensor, base: torch.Tensor, cfg: UpsamplerConfig) -> torch.Tensor:
    """What is diffused: the image, or its residual over the upsampled input, scaled."""
    return x64 if cfg.residual_scale is None else (x64 - base) * cfg.residual_scale


def from_target(x_start: torch.Tensor, base: torch.Tensor, cfg: UpsamplerConfig) -> torch.Tensor:
    """The inverse of `to_target`, clipped to [-1, 1]."""
    return (x_start if cfg.residual_scale is None else base + x_start / cfg.residual_scale).clamp(-1, 1)


def check_config(cfg: UpsamplerConfig) -> None:
    """Crop and image sizes must pass through every level of the U-Net."""
    unit = 2 * cfg.patch_size * 2 ** (len(cfg.channel_mults) - 1)  # x2: crops start on even pixels
    for name, size in (("crop_size", cfg.crop_size), ("the image size", HIGH_RES)):
        if size % unit or size > HIGH_RES:
            raise ValueError(f"upsampler {name} {size} must be a multiple of {unit} (2 x patch_size x "
                             f"2^(levels-1)) and at most {HIGH_RES}")
    upsample_condition(torch.zeros(1, 3, 2, 2), cfg.cond_upsample, 4)


# ---------------------------------------------------------------------------------------------
# Training


class UpsamplerBatches:
    """`get_batch(step)`: random crops of 64 px images, the same crop of their corrupted and
    upsampled 32 px downsample, and the timestep, noise, blur and aug draws (a pure function of
    the step). The condition is corrupted and upsampled on the full image before cropping, so a
    crop sees the same condition as the same pixels of a full image."""

    def __init__(self, images: torch.Tensor, cfg: UpsamplerConfig, seed: int):
        check_config(cfg)
        if images.shape[-1] != HIGH_RES:
            raise ValueError(f"the upsampler trains on {HIGH_RES} px images, got {tuple(images.shape)}")
        self.images, self.low = images, resize_uint8(images, LOW_RES)  # uint8 (N, 3, 64, 64), (N, 3, 32, 32)
        self.cfg, self.seed = cfg, seed

    def __call__(self, step: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        cfg, b, c = self.cfg, self.cfg.train.batch_size, self.cfg.crop_size
        idx = torch.randint(len(self.images), (b,), generator=g)
        x64 = to_float(self.images[idx])  # (B, 3, 64, 64)
        x32 = to_float(self.low[idx])  # (B, 3, 32, 32)
        blur = torch.rand(b, generator=g) < cfg.p_blur
        aug = torch.where(torch.rand(b, generator=g) < cfg.p_aug, torch.rand(b, generator=g) * cfg.aug_max,
                          torch.zeros(b))
        given = corrupt(x32, blur, torch.zeros(b), cfg)  # what the upsampler is given: maybe blurred
        cond = upsample_condition(given + aug[:, None, None, None] * torch.randn(x32.shape, generator=g),
                                  cfg.cond_upsample)  # (B, 3, 64, 64): what the model sees
        top, left = (torch.randint(0, (HIGH_RES - c) // 2 + 1, (2, b), generator=g) * 2).tolist()
        crop = lambda x: torch.stack([x[i, :, y:y + c, z:z + c] for i, (y, z) in enumerate(zip(top, left))])  # noqa: E731
        x_start = crop(to_target(x64, bicubic_upsample(given), cfg))
        return {"x_start": x_start, "cond": crop(cond), "aug": aug, "blur": blur, "top": torch.tensor(top),
                "left": torch.tensor(left), "t": torch.randint(0, 1000, (b,), generator=g),
                "noise": torch.randn(x_start.shape, generator=g)}


def upsampler_loss(diffusion: GaussianDiffusion, min_snr_gamma: float | None = None):
    return diffusion.batch_loss(lambda model, b, x, t: model(x, t, b["cond"], b["aug"]), min_snr_gamma)


# ---------------------------------------------------------------------------------------------
# Sampling


class TrainedUpsampler(TrainedDenoiser):
    """A trained upsampler with its config and diffusion, for sampling."""

    make_diffusion = staticmethod(make_diffusion)

    @torch.no_grad()
    def upsample(self, x32: torch.Tensor, steps: int | None = None, aug_level: float | None = None, seed: int = 0,
                 batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """(B, 3, 32, 32) images in [-1, 1] -> (B, 3, 64, 64) in [-1, 1], by DDIM (eta = 0).

        `steps` DDIM steps (default cfg.sample_steps); `aug_level` the noise level added to the
        input and told to the model (default cfg.aug_level; higher trusts the input's details
        less). The starting noise and the aug noise are drawn per image from `seed` before
        batching, so the result depends on the seed only, not on `batch_size`.
        """
        if x32.ndim != 4 or x32.shape[1] != 3 or x32.shape[-2:] != (LOW_RES, LOW_RES):
            raise ValueError(f"upsample expects (B, 3, {LOW_RES}, {LOW_RES}) images in [-1, 1], got {tuple(x32.shape)}")
        steps = steps or self.cfg.sample_steps
        aug_level = self.cfg.aug_level if aug_level is None else float(aug_level)
        if aug_level < 0:
            raise ValueError(f"aug_level must be >= 0, got {aug_level}")
        g = torch.Generator().manual_seed(seed)
        b = x32.shape[0]
        x_T = torch.randn(b, 3, HIGH_RES, HIGH_RES, generator=g)
        aug_noise = torch.randn(b, 3, LOW_RES, LOW_RES, generator=g)
        diffusion = self.diffusion.respaced(steps)
        out = []
        for i in tqdm(range(0, b, batch_size), desc="upsample", disable=not progress, leave=False):
            sl = slice(i, i + batch_size)
            n = len(x32[sl])
            level = torch.full((n,), aug_level)
            cond = corrupt(x32[sl].float(), torch.zeros(n, dtype=torch.bool), level, self.cfg, aug_noise[sl])
            cond = upsample_condition(cond, self.cfg.cond_upsample).to(self.device)
            base = bicubic_upsample(x32[sl].float()).to(self.device)
            level = level.to(self.device)

            def fn(x, t, cond=cond, level=level):
                with autocast(self.device, self.precision):
                    return self.model(x, t, cond, level).float()
            x_start = diffusion.sample(fn, x_T[sl], eta=0.0, device=self.device)
            out.append(from_target(x_start, base, self.cfg).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_upsampler(trained: TrainedUpsampler, val_data, n: int, cache_dir: Path | None = None,
                       steps: int | None = None, seed: int = 0) -> dict:
    """PSNR on the first `n` images of `val_data` (a val dataset) against their real 64 px versions:
    the upsampler and bicubic, from the clean 32 px downsample and from a blurred one (kernel 3,
    sigma 0.6); plus sampling time per image."""
    x64 = rendered(val_data, n, cache_dir)["images"]
    x32 = to_float(resize_uint8(x64, LOW_RES))
    x64 = to_float(x64)
    blurred = gaussian_blur(x32, trained.cfg.blur_sigma, trained.cfg.blur_kernel)
    out = {"n_eval": len(x64), "steps": steps or trained.cfg.sample_steps, "aug_level": trained.cfg.aug_level}
    for name, inp in (("clean", x32), ("blurred", blurred)):
        t0 = time.perf_counter()
        up = trained.upsample(inp, steps=steps, seed=seed, batch_size=16)
        wall = time.perf_counter() - t0
        out[name] = {"psnr_upsampler": round(float(psnr(up, x64).mean()), 3), "psnr_bicubic": round(float(psnr(bicubic_upsample(inp), x64).mean()), 3),
                     "psnr_nearest": round(float(psnr(upsample_condition(inp, "nearest"), x64).mean()), 3)}
        if name == "clean":
            out["sample_s_per_image_batch16"] = round(wall / len(x64), 4)
    return out


# ---------------------------------------------------------------------------------------------
# The artifact


def _stage_config(preset: Preset) -> dict:
    return {"upsampler": to_dict(preset.upsampler), **source_config(preset)}


def train_upsampler(preset: Preset, out_dir: str | Path, progress: bool = True) -> TrainedUpsampler:
    """Train the upsampler on rendered ShapesWorld train scenes, evaluate it on val, and save it."""
    cfg = preset.upsampler
    check_config(cfg)
    out_dir = Path(out_dir)
    cache_dir = out_dir.parent / "cache"
    images = rendered(dataset(preset, "train"), cfg.n_train_images, cache_dir)["images"]
    stage_config = _stage_config(preset)
    seed_everything(cfg.train.seed)
    model = Upsampler(cfg)
    train_metrics = train(model, upsampler_loss(make_diffusion(cfg), cfg.min_snr_gamma),
                          UpsamplerBatches(images, cfg, cfg.train.seed), cfg.train, run_dir=out_dir,
                          progress=progress, desc="upsampler", run_config=stage_config)
    trained = TrainedUpsampler(model, cfg, device=cfg.train.device)
    metrics = {"train": train_metrics, "n_params": sum(p.numel() for p in model.parameters()),
               "val": evaluate_upsampler(trained, dataset(preset, "val"), cfg.n_eval, cache_dir)}
    ckpt.save_stage(out_dir, "upsampler", model.state_dict(), stage_config, metrics)
    clear_state(out_dir)
    trained.metrics = ckpt.read_json(out_dir / ckpt.METRICS)
    return trained


def load_upsampler(folder: str | Path, preset: Preset | None = None) -> TrainedUpsampler:
    """Load an upsampler artifact; with `preset`, its stored config must match the preset's."""
    expected = _stage_config(preset) if preset is not None else None
    state, meta, metrics = ckpt.load_stage(folder, "upsampler", expected)
    cfg = from_dict(UpsamplerConfig, meta["config"]["upsampler"])
    model = Upsampler(cfg)
    model.load_state_dict(state)
    return TrainedUpsampler(model, cfg, device=cfg.train.device, metrics=metrics)


def ensure_upsampler(artifacts_dir: str | Path, preset: Preset, retrain: bool = False,
                     progress: bool = True) -> TrainedUpsampler:
    """Load the upsampler from `artifacts_dir/upsampler`, training it if missing or stale."""
    folder = Path(artifacts_dir) / "upsampler"
    return ensure_stage(folder, "upsampler", lambda: load_upsampler(folder, preset),
                        lambda: train_upsampler(preset, folder, progress), retrain)
