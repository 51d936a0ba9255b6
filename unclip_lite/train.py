"""One training loop for every stage.

AdamW with linear warmup and cosine decay, an EMA of the weights, global gradient clipping,
bf16 autocast where the hardware runs it natively, a `tqdm.auto` progress bar, periodic
resumable checkpoints, and samples/s in the returned metrics.

A stage supplies three things:
- ``model``: an ``nn.Module``;
- ``loss_fn(model, batch) -> loss`` or ``(loss, {name: float})``;
- ``get_batch(step) -> batch``: a pure function of the step, so a resumed run sees exactly the
  batches the interrupted one would have seen.

A non-finite loss stops training with `NonFiniteLossError`; the last checkpoint on disk is the
last good one and is left untouched.

Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel: the process group is started
(gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel, every rank builds
the step's global batch (still a pure function of the step) and keeps its slice (`shard`), so
W ranks x B/W samples see exactly the samples of 1 rank x B. Rank 0 alone writes checkpoints,
snapshots and the artifact; every rank resumes from the same checkpoint. A loss function calls
the model (`model(...)`, which DDP needs); for other methods it uses `unwrap(model)`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import config as config_lib
from .config import TrainConfig
from .runtime import (autocast, barrier, init_distributed, is_main_process, resolve_device, resolve_precision,
                      seed_everything, world)

STATE_FILE = "train_state.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or inf."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(batch: Any, rank: int, world_size: int, batch_size: int) -> Any:
    """This rank's slice of a global batch: every tensor whose first dimension is the batch size
    is cut into `world_size` equal parts along it; other values (and the keys a dict lists under
    "unsharded", such as CLIP's (B, B) positives, which its loss needs whole) pass unchanged."""
    if world_size == 1:
        return batch
    per = batch_size // world_size
    keep = set(batch.get("unsharded", ())) if isinstance(batch, dict) else set()

    def cut(v):
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch_size:
            return v[rank * per:(rank + 1) * per]
        if isinstance(v, dict):
            return {k: x if k in keep else cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and len(v) == batch_size and not isinstance(v, str):
            return type(v)(v[rank * per:(rank + 1) * per])
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v)
        return v
    return cut(batch)


def _mean_over_ranks(value: float, world_size: int, device) -> float:
    if world_size == 1:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size


class EMA:
    """Exponential moving average of a model's parameters and buffers (kept in float32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1 - d)
            else:
                s.copy_(v)

    def state_dict(self, like: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights in the dtypes of `like`'s state dict."""
        ref = like.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.shadow.items()}


def train(model: nn.Module, loss_fn: Callable, get_batch: Callable[[int], Any], cfg: TrainConfig,
          run_dir: str | Path | None = None, progress: bool = True, desc: str = "train",
          run_config: dict | None = None, stop_after: int | None = None, snapshot_steps: tuple[int, ...] = ()) -> dict:
    """Train `model` in place; on return it holds the EMA weights. Returns the metrics dict.

    `stop_after=k` trains only the first k steps of the cfg.steps-step schedule (the learning
    rate follows the full schedule); `snapshot_steps` keeps the EMA weights after those steps in
    run_dir/snapshots/ (`snapshot_path`). Together they give two models at matched compute.

    With `run_dir`, a resumable checkpoint is written there every `cfg.checkpoint_every` steps
    and at the end; an interrupted run continues from it. `run_config` (the whole stage config:
    model, data) is stored with it, and a resume under any other config (other than a changed
    step count) is refused. The caller removes the checkpoint with `clear_state` once it has
    saved the stage's artifact, so a crash in between loses nothing.
    """
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    rank, world_size = init_distributed(device)
    if cfg.batch_size % world_size:
        raise ValueError(f"{desc}: train.batch_size = {cfg.batch_size} does not split over {world_size} ranks; "
                         f"use a multiple of {world_size}")
    seed_everything(cfg.seed)
    model.to(device)
    decay_params = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other_params = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # fused AdamW: measured 5x faster than the default per-parameter loop on this CPU (7 vs 39 ms
    # a step for CLIP's 7M parameters), which matters at a few hundred ms per step
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                             {"params": other_params, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cpu", "cuda"))
    ema = EMA(model, cfg.ema_decay)
    history: list[list[float]] = []
    start, resumed_from = 0, None
    state_path = Path(run_dir) / STATE_FILE if run_dir is not None else None
    full_config = {"train": config_lib.to_dict(cfg), "run": run_config or {}}
    runtime = {"device": device.type, "precision": precision}  # part of the run's identity

    barrier()  # rank 0 has finished what came before (removing an old checkpoint, say)...
    resume = state_path is not None and state_path.exists()
    barrier()  # ...and every rank has looked for the checkpoint before rank 0 may write one
    if resume:
        state = ckpt.load_state(state_path)
        differences = [d for d in config_lib.diff(state["config"], full_config) if not d.startswith("train.steps:")]
        if differences:
            raise ckpt.ConfigMismatchError(state_path, differences, advice=(
                f"It is an interrupted run's checkpoint; delete {state_path} to start this run over."))
        stored = state.get("runtime")
        if stored is not None and stored != runtime:
            raise ckpt.ArtifactError(
                f"{state_path} is an interrupted run on {stored['device']} in {stored['precision']}; this process "
                f"runs on {runtime['device']} in {runtime['precision']}, and a resume must not switch precision "
                f"mid-run. Resume where it started (or set UNCLIP_PRECISION={stored['precision']}), or delete "
                f"{state_path} to start over.")
        model.load_state_dict(state["model"])
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        history = [list(h) for h in state["history"]]

    def save_checkpoint(step: int) -> None:
        if state_path is None or not is_main_process():
            return
        ckpt.save_state(state_path, {
            "step": step, "model": model.state_dict(), "ema": ema.shadow,
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "history": history, "config": full_config, "runtime": runtime,
        })

    end = cfg.steps if stop_after is None else stop_after
    if not 0 < end <= cfg.steps:
        raise ValueError(f"{desc}: stop_after must lie in 1..steps ({cfg.steps}), got {stop_after}")
    model.train()
    net = model
    if world_size > 1:  # gradients averaged over ranks in backward(); parameters broadcast from rank 0
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bar = tqdm(total=end, initial=start, desc=desc, disable=not progress or not is_main_process(), leave=False)
    t0, samples, loss_sum, loss_n, last_logs = time.perf_counter(), 0, 0.0, 0, {}
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = to_device(shard(get_batch(step), rank, world_size, cfg.batch_size), device)
        with autocast(device, precision):
            out = loss_fn(net, batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        loss_value = _mean_over_ranks(float(loss.detach()), world_size, device)  # the global batch's loss
        if not math.isfinite(loss_value):
            bar.close()
            raise NonFiniteLossError(f"{desc}: the loss became {loss_value} at step {step}; training "
                                     f"stopped and {_kept(state_path)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not math.isfinite(gnorm):
                bar.close()
                raise NonFiniteLossError(f"{desc}: the gradient norm became {gnorm} at step {step}; "
                                         f"training stopped and {_kept(state_path)}")
        opt.step()
        ema.update(model, 0.0 if step < cfg.ema_start else None)
        samples += _batch_size(batch) * world_size
        loss_sum, loss_n, last_logs = loss_sum + loss_value, loss_n + 1, logs
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            history.append([step + 1, loss_sum / loss_n])
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}")
            loss_sum, loss_n = 0.0, 0
        bar.update(1)
        # the snapshot first: a kill between the two writes then resumes from the older
        # checkpoint and writes the snapshot again, instead of resuming past it and losing it
        if step + 1 in snapshot_steps and run_dir is not None and is_main_process():
            ckpt.save_tensors(snapshot_path(run_dir, step + 1), ema.state_dict(model))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < end:
            save_checkpoint(step + 1)
    bar.close()
    wall = time.perf_counter() - t0
    if start < end:
        save_checkpoint(end)
    barrier()
    model.load_state_dict(ema.state_dict(model))
    recalibrate_batchnorm(model, loss_fn, get_batch, range(cfg.steps, cfg.steps + BN_RECALIBRATION_BATCHES),
                          device, precision, cfg.batch_size if world_size > 1 else None)
    model.eval()
    return {
        "steps": end,
        "schedule_steps": cfg.steps,
        "resumed_from": resumed_from,
        "final_loss": history[-1][1] if history else None,
        "loss_history": history,
        "last_logs": {k: float(v) for k, v in last_logs.items()},
        "wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 1) if wall > 0 else None,
        "precision": precision,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        **({"world_size": world_size} if world_size > 1 else {}),
    }


def _kept(state_path: Path | None) -> str:
    if state_path is not None and state_path.exists():
        return (f"the last good checkpoint is kept at {state_path}. Check the data, or delete the "
                "checkpoint and lower the learning rate (a resume needs the same config).")
    return "no checkpoint had been written yet. Check the data, or lower the learning rate."


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """Where `train` keeps the EMA weights after `step` (its `snapshot_steps`)."""
    return Path(run_dir) / "snapshots" / f"step_{step}.safetensors"


def clear_state(run_dir: str | Path) -> None:
    """Remove a finished run's resumable checkpoint (call after saving the stage artifact); under
    torchrun, rank 0 does."""
    if is_main_process():
        (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)


BN_RECALIBRATION_BATCHES = 16


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loss_fn: Callable, get_batch: Callable, steps, device, precision,
                          batch_size: int | None = None) -> None:
    """Re-estimate BatchNorm statistics for the current (EMA) weights.

    The EMA averages running statistics that belong to earlier weights; for a network still
    moving fast this mismatch is severe (measured on the judge: 17% shape accuracy with averaged
    statistics, against 53% for the raw weights). As in SWA, a few forward passes in train mode
    with a cumulative average fix it. Models without BatchNorm are left alone. Under torchrun each
    rank passes its slice of each batch and the statistics are then averaged over the ranks, so
    every rank ends with the same buffers (the mean exactly; the variance without the spread
    between slices, a small difference from one process).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    rank, world_size = world()
    for step in steps:
        with autocast(device, precision):  # the batch too (its augmentations then run in bf16, as they always have here)
            batch = get_batch(step) if batch_size is None else shard(get_batch(step), rank, world_size, batch_size)
            loss_fn(model, to_device(batch, device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if world_size > 1:
            import torch.distributed as dist
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= world_size


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    return 1

