"""CLIP training-step throughput, and the choices it depends on.

    python benchmarks/bench_clip.py

Times one course-preset training step (forward, backward, optimiser) of the course CLIP under
each choice the code makes: bf16 against fp32, channels_last, the attention kernel (the ViT
alternative shows it most), and fused AdamW. It projects the course's CLIP training time from
the winning configuration and checks it against the 4-minute budget. Writes build/bench/clip.json
and exits 1 if the projection is over budget.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from unclip_lite.runtime import attention_backend
from unclip_lite.clip_model import load_clip
from unclip_lite.clip import MultiPositiveClipLoss
from unclip_lite.config import get_preset
from unclip_lite.runtime import autocast

OUT = Path(__file__).resolve().parents[1] / "build" / "bench"
BUDGET_S = 240.0


def step_time(model_name: str, batch: int, precision: str, channels_last: bool, math_attention: bool,
              fused: bool, n: int = 6) -> float:
    torch.manual_seed(0)
    clip = load_clip(model_name, precision=precision)
    model = clip.model.train()
    size = clip.image_size
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    text = clip.tokenize(["a big red star left of a small blue ring, striped background"] * batch)
    positives = torch.eye(batch, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    loss_fn = MultiPositiveClipLoss()

    def step():
        with autocast("cpu", precision), (attention_backend() if math_attention else contextlib.nullcontext()):
            zi = model.encode_image(x, normalize=True)
            zt = model.encode_text(text, normalize=True)
            loss = loss_fn(zi.float(), zt.float(), model.logit_scale.exp().float(), positives)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def bench() -> dict:
    cfg = get_preset("course").clip
    b = cfg.train.batch_size
    rows = {}
    base = dict(precision="bf16", channels_last=True, math_attention=True, fused=True)
    variants = {
        "course (bf16, channels_last, math attention, fused AdamW)": base,
        "fp32": {**base, "precision": "fp32"},
        "no channels_last": {**base, "channels_last": False},
        "default attention kernel": {**base, "math_attention": False},
        "unfused AdamW": {**base, "fused": False},
    }
    for name, kw in variants.items():
        rows[f"{cfg.model}: {name}"] = round(b / step_time(cfg.model, b, **kw), 1)
    for name, kw in (("math attention", base), ("default attention kernel", {**base, "math_attention": False})):
        rows[f"shapes-vit-32: {name}"] = round(b / step_time("shapes-vit-32", b, **kw), 1)
    best = rows[f"{cfg.model}: course (bf16, channels_last, math attention, fused AdamW)"]
    projected = cfg.train.steps * b / best
    return {"pairs_per_s": rows, "threads": torch.get_num_threads(), "course_steps": cfg.train.steps,
            "batch_size": b, "projected_train_s": round(projected, 1), "budget_s": BUDGET_S,
            "within_budget": projected <= BUDGET_S}


if __name__ == "__main__":
    result = bench()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "clip.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["within_budget"] else 1)
