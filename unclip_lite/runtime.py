"""Device, precision and seeding: chosen here and nowhere else.

`auto` means CUDA when present, else the CPU; bf16 autocast wherever the hardware runs bf16
matrix work natively (CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX). On this course's
reference CPU (AVX512-BF16, no AMX) bf16 runs matmuls and convolutions 1.6-3x faster than fp32,
depending on the operation and the run (`benchmarks/bench_precision.py`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from functools import lru_cache

import numpy as np
import torch

PRECISIONS = ("auto", "bf16", "fp32")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA if available, else CPU. Anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@lru_cache(maxsize=None)
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_description() -> str:
    """A short description of this machine for timing records: CPU model, the cores torch may use,
    and whether the CPU has AMX (whose bf16 kernels differ from AVX512-BF16's, so stages train
    to other weights there)."""
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    return f"{model}, {torch.get_num_threads()} threads" + (", AMX" if "amx_bf16" in info else "")


def resolve_precision(precision: str = "auto", device: str | torch.device = "auto") -> str:
    """Return "bf16" or "fp32". `auto` picks bf16 where the hardware runs it natively.

    The environment variable UNCLIP_PRECISION overrides `auto` (useful for measurements).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = os.environ.get("UNCLIP_PRECISION", "auto")
        if precision not in PRECISIONS:
            raise ValueError(f"the environment variable UNCLIP_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    dev = resolve_device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: str | torch.device, precision: str):
    """The autocast context for a resolved (device, precision) pair; a no-op for fp32."""
    dev = resolve_device(device)
    if resolve_precision(precision, dev) == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attention_backend():
    """The scaled-dot-product attention kernel for this project's short sequences on CPU.

    Measured here (bf16): PyTorch's default CPU flash-attention kernel made CLIP's training step
    1.3x slower than the plain math kernel (617 vs 791 pairs/s; 1.5x for a ViT), because its
    backward pass is poorly vectorised for sequences of 20-100 tokens. Use as a context manager
    around CPU forward passes; on CUDA the default choice is kept by not entering it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


STREAMS = {"prior": 0, "decoder": 1, "upsampler": 2}  # one random stream per stage and seed


def check_seed(seed) -> int:
    """A seed is an integer in [0, 2**63): refuse anything else with a message that says so."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed = {seed!r}: must be an integer in [0, 2**63)")
    return int(seed)


def check_arg(name: str, value, minimum: float = 0, integer: bool = False, none_ok: bool = True):
    """Refuse a bad numeric argument, naming it, its value and what is allowed: an integer (when
    `integer`) or a finite number, >= `minimum`; None when `none_ok` (meaning "the default")."""
    if value is None and none_ok:
        return None
    what = ("an integer" if integer else "a finite number") + f" >= {minimum:g}" + (" (or None: the default)" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} = {value!r}: must be {what}")
    if (integer and not isinstance(value, (int, np.integer))) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} = {value!r}: must be {what}")
    return value


def stage_seed(seed: int, stage: str) -> int:
    """The seed of `stage`'s random stream for a user seed: distinct stages never share noise."""
    check_seed(seed)
    return int(np.random.SeedSequence([seed, STREAMS[stage]]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): torch.distributed, initialised from torchrun's environment


def world() -> tuple[int, int]:
    """(rank, world size): from the process group once it is up, else from torchrun's RANK and
    WORLD_SIZE, else (0, 1), a single process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes artifacts, checkpoints and caches."""
    return world()[0] == 0


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1) start the default process group once: "nccl" on CUDA (one
    GPU per local rank), "gloo" on CPU. Returns (rank, world size); (0, 1) without torchrun."""
    import torch.distributed as dist
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank, size = world()
    return rank, size


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (building a cache, say) while the others wait; then they run
    it and find rank 0's result. In a single process, or nested inside another such block, just
    the block."""
    global _FIRST_DEPTH
    rank, size = world()
    outer = _FIRST_DEPTH == 0 and size > 1
    _FIRST_DEPTH += 1
    try:
        if outer and rank != 0:
            barrier()
        yield
    finally:
        _FIRST_DEPTH -= 1
        if outer and rank == 0:
            barrier()


_FIRST_DEPTH = 0
