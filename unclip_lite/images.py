"""Pixel conventions, in one place.

Datasets hold images as uint8 (N, 3, H, W); the diffusion models work on float images in
[-1, 1]. `to_float` and `to_uint8` convert between the two, `resize_uint8` and
`to_model_images` resize the way the decoder's training images were resized (bicubic,
antialiased), and the degradations (`gaussian_blur`, `degrade`) and `psnr` act on [-1, 1] images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32  # the decoder's resolution (the upsampler doubles it)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the diffusion models' convention)."""
    return images.float().div(127.5).sub(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8, same layout."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def to_numpy_hwc(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 numpy (N, H, W, 3), for plotting and PNGs."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, 3, H, W) images resized to size x size (antialiased), still uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=images.shape[-1] > size).round().clamp(0, 255).to(torch.uint8)
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def check_images(images, name: str = "images") -> torch.Tensor:
    """Refuse, rather than guess: images must be a tensor (N, 3, H, W), uint8 in [0, 255] or
    floating point in [-1, 1] (the models' convention). Returns them unchanged."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
        if images.numel() and not torch.isfinite(images).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        lo, hi = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"float {name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "for images in [0, 1] pass x * 2 - 1, for [0, 255] pass them as uint8")
    return images


def to_model_images(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) or float [-1, 1] images -> float [-1, 1] at `size` px (the decoder's 32
    by default), resized the way the decoder's training images were (bicubic, antialiased).
    Anything else is refused (`check_images`)."""
    check_images(images)
    if images.dtype == torch.uint8:
        return to_float(resize_uint8(images, size))
    x = images.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=x.shape[-1] > size).clamp(-1, 1)
    return x


def pixels(data: dict, size: int = 16) -> torch.Tensor:
    """A dataset's images as flat pixel vectors at `size` px, in [0, 1]: the probes' baseline."""
    return resize_uint8(data["images"], size).flatten(1).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB between images in [-1, 1] (peak-to-peak 2), per image (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


# ---------------------------------------------------------------------------------------------
# Degradations (the judge's training augmentation, its "degraded" report, the upsampler's input)


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
