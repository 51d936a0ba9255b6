"""What every stage shares above the training loop: `TrainedModel` (a trained network placed for
use), `ensure_stage` (load a stage's artifact, or train it when it is missing or stale) and
`save_results` (a study's settings and measurements, written beside the stages)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .runtime import resolve_device, resolve_precision
from .train import clear_state


class TrainedModel:
    """A trained network placed for use: on its device, in eval mode, with the precision it runs
    in and the metrics its artifact recorded. Each stage's `Trained*` class builds on this."""

    def __init__(self, model: torch.nn.Module, device: str = "auto", precision: str = "auto",
                 metrics: dict | None = None):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.metrics = metrics or {}


class TrainedDenoiser(TrainedModel):
    """A trained diffusion network with its stage config and the diffusion it was trained under:
    `make_diffusion(cfg)`, which each stage sets on its subclass."""

    make_diffusion: Callable

    def __init__(self, model: torch.nn.Module, cfg, device: str = "auto", precision: str = "auto",
                 metrics: dict | None = None):
        super().__init__(model, device, precision, metrics)
        self.cfg = cfg
        self.diffusion = type(self).make_diffusion(cfg)


def ensure_stage(folder: str | Path, label: str, load: Callable[[], Any], train_new: Callable[[], Any],
                 retrain: bool = False, wait: bool | None = None) -> Any:
    """Load a stage's artifact with `load()`, or train it with `train_new()` when it is missing.

    A stored artifact made with another config (`load` raises ConfigMismatchError), or any
    stored artifact when `retrain`, is moved aside to `<folder>.stale-<time>` first: nothing saved
    is lost, and the message says which fields differed. With `retrain` and no artifact, an
    interrupted run's checkpoint is removed so that the new run starts over.

    All of it happens under the folder's exclusive lock (`checkpoint.stage_lock`): a second
    process that wants the same stage waits for the first (and then loads what it trained), or
    with `wait=False` (or UNCLIP_LOCK_WAIT=0) fails at once naming the process that holds it.
    """
    folder = Path(folder)
    wait = os.environ.get("UNCLIP_LOCK_WAIT", "1") != "0" if wait is None else wait
    with ckpt.stage_lock(folder, wait=wait):
        if ckpt.stage_exists(folder):
            reason = "retrain=True"
            if not retrain:
                try:
                    return load()
                except ckpt.ConfigMismatchError as err:
                    reason = "its config differs: " + "; ".join(err.differences)
            print(f"{folder.name}: moved the stored {label} to {ckpt.archive_stage(folder)} ({reason}); training a new one")
        elif retrain:
            clear_state(folder)
        return train_new()


def without_images(result):
    """A result without its tensors (images, features): what goes into metrics.json."""
    if isinstance(result, dict):
        return {k: without_images(v) for k, v in result.items() if not isinstance(v, torch.Tensor)}
    if isinstance(result, (list, tuple)):
        return [without_images(v) for v in result]
    return result


def save_results(artifacts_dir: str | Path, name: str, config: dict, metrics: dict) -> Path:
    """Write a study's `config.json` (the settings that produced it) and `metrics.json` (what it
    measured, tensors left out) into `<artifacts_dir>/<name>/`; returns that folder."""
    folder = Path(artifacts_dir) / name
    ckpt.write_json(folder / "config.json", config)
    ckpt.write_json(folder / "metrics.json", without_images(metrics))
    return folder
