"""Train a decoder on a GPU for a fixed time with the project's own command, and time the `gpu` preset.

    python scripts/gpu_decoder.py --artifacts build/exp --seconds 300 --out OUTDIR

What it does, in order:
1. times a training step of the course decoder at `--batch` and of the `gpu` preset's decoder, on
   this device (after warm-up), and writes `timing.json`;
2. picks the step count that fills `--seconds` at the measured speed, and runs
   `python -m unclip_lite train decoder --preset course --artifacts ARTIFACTS --set ...`
   (the course architecture and recipe, a larger batch, more steps, the whole course train split);
3. copies the artifact (weights, config, metrics with the judge's reading) and a `made_by.json`
   (the exact command, the device, the time) to `--out`.

CLIP and the judge must already be in `--artifacts`: the decoder is trained on that CLIP's z_i, so
it is only valid next to a CLIP with the same fingerprint (checked when it is loaded).

Measured on an H200 (2026-12-04): the bare course-decoder step runs 5,871 images/s at batch 256, but
a real run reaches about 3,400 images/s, because each step's batch is gathered on the host; so a
`--seconds` budget overshoots by about 1.7x. The shipped reference decoder was made by the train
command alone, with the step count set by hand (its `made_by.json` has the command).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unclip_lite.clip import load_clip_stage  # noqa: E402
from unclip_lite.commands import apply_overrides  # noqa: E402
from unclip_lite.config import get_preset  # noqa: E402
from unclip_lite.decoder import Decoder, decoder_loss, make_diffusion  # noqa: E402
from unclip_lite.runtime import autocast, resolve_device, resolve_precision  # noqa: E402


def step_time(cfg, clip, device, precision, batch: int, repeats: int = 20) -> float:
    """Seconds per training step (forward, backward, fused AdamW) of a decoder config on random data."""
    model = Decoder(cfg, clip.embed_dim, clip.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    loss_fn = decoder_loss(make_diffusion(cfg), cfg.min_snr_gamma)
    batch_data = {"x_start": torch.randn(batch, 3, 32, 32, device=device), "z": torch.randn(batch, clip.embed_dim, device=device),
                  "states": torch.randn(batch, 20, clip.width, device=device),
                  "mask": torch.ones(batch, 20, dtype=torch.bool, device=device),
                  "t": torch.randint(0, 1000, (batch,), device=device), "noise": torch.randn(batch, 3, 32, 32, device=device),
                  "drop_z": torch.zeros(batch, dtype=torch.bool, device=device),
                  "drop_text": torch.zeros(batch, dtype=torch.bool, device=device)}

    def one():
        with autocast(device, precision):
            loss = loss_fn(model, batch_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(5):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-steps", type=int, default=40_000)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more preset overrides")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    clip = load_clip_stage(args.artifacts / "clip")
    course, gpu = get_preset("course"), get_preset("gpu")
    timing = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "precision": precision,
              "torch": torch.__version__}
    s_course = step_time(course.decoder, clip, device, precision, args.batch)
    timing["course_decoder"] = {"batch": args.batch, "step_s": s_course, "images_per_s": args.batch / s_course}
    s_gpu = step_time(gpu.decoder, clip, device, precision, gpu.decoder.train.batch_size)
    timing["gpu_preset_decoder"] = {"batch": gpu.decoder.train.batch_size, "step_s": s_gpu,
                                    "images_per_s": gpu.decoder.train.batch_size / s_gpu,
                                    "steps": gpu.decoder.train.steps,
                                    "estimated_train_s": gpu.decoder.train.steps * s_gpu}
    print(json.dumps(timing, indent=1), flush=True)
    (args.out / "timing.json").write_text(json.dumps(timing, indent=1))

    steps = int(min(args.max_steps, args.seconds / s_course))
    overrides = [f"decoder.train.steps={steps}", f"decoder.train.batch_size={args.batch}", f"decoder.train.lr={args.lr}",
                 f"decoder.train.warmup_steps={max(100, steps // 40)}", "decoder.train.ema_decay=0.9995",
                 f"decoder.train.checkpoint_every={steps}", f"decoder.baseline_steps={steps}",
                 f"decoder.n_train_images={course.world.n_train}", *args.extra]
    apply_overrides(get_preset("course"), overrides)  # fail here, not after minutes, on a bad override
    command = [sys.executable, "-m", "unclip_lite", "train", "decoder", "--preset", "course",
               "--artifacts", str(args.artifacts), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT)
    wall = time.perf_counter() - t0
    made_by = {"command": "python -m unclip_lite train decoder --preset course --artifacts ARTIFACTS "
                          + " ".join(f"--set {o}" for o in overrides),
               "returncode": proc.returncode, "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d"), **timing}
    (args.out / "made_by.json").write_text(json.dumps(made_by, indent=1))
    if proc.returncode != 0:
        return proc.returncode
    folder = args.artifacts / "decoder"
    for name in ("model.safetensors", "config.json", "metrics.json"):
        shutil.copy(folder / name, args.out / name)
    print(json.dumps(made_by, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
