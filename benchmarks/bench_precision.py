"""fp32 against bf16 autocast on this CPU: a matmul, a convolution, and a judge training step.

    python benchmarks/bench_precision.py

Writes build/bench/precision.json. The course's `auto` precision picks bf16 where the CPU has
native bf16 dot products (AVX512-BF16 or AMX); these numbers are why.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from unclip_lite.judge import HEADS, Judge, judge_loss
from unclip_lite.runtime import autocast, cpu_has_fast_bf16

OUT = Path(__file__).resolve().parents[1] / "build" / "bench"


def _time(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench() -> dict:
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "cpu_has_fast_bf16": cpu_has_fast_bf16()}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        out[f"matmul_1024_gflops_{name}"] = round(2 * 1024**3 / _time(lambda: x @ y, 20) / 1e9, 1)
    conv, img = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(64, 64, 32, 32)
    flops = 2 * 64 * 64 * 9 * 64 * 32 * 32
    for name in ("fp32", "bf16"):
        with torch.no_grad(), autocast("cpu", name):
            out[f"conv_gflops_{name}"] = round(flops / _time(lambda: conv(img), 10) / 1e9, 1)
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {"x": torch.rand(64, 3, 32, 32) * 2 - 1, **{h: torch.randint(len(v), (64,)) for h, v in HEADS.items()},
             "pos": torch.rand(64, 2)}

    def step(name):
        with autocast("cpu", name):
            loss, _ = judge_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in ("fp32", "bf16"):
        out[f"judge_train_images_per_s_{name}"] = round(64 / _time(lambda: step(name), 10), 1)
    out["judge_speedup_bf16"] = round(out["judge_train_images_per_s_bf16"] / out["judge_train_images_per_s_fp32"], 2)
    return out


if __name__ == "__main__":
    result = bench()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
