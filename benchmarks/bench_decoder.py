"""Decoder training speed against lucidrains' DALLE2-pytorch `Unet`, under matched conditions.

    python benchmarks/bench_decoder.py

Both networks take one training step (forward, MSE loss, backward, AdamW) on 32 px images, batch
64, conditioned on a 64-d image embedding and 22 caption token states of width 128, each at its
fastest precision on this machine (fp32 and bf16 autocast are both timed). The DALLE2-pytorch
`Unet` is sized to our course decoder's parameter count (within 10%).

DALLE2-pytorch is installed into its own venv (build/bench/dalle2-venv) by this script, on the
first run: it sees this project's torch through a .pth file, so nothing is downloaded twice and
the course environment is untouched. Writes build/bench/decoder.json; exits 1 if our decoder is
under 3x as fast or the sizes do not match.
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench"
VENV = OUT / "dalle2-venv"
PACKAGE = "dalle2-pytorch==1.15.6"
BATCH, SIZE, Z_DIM, TEXT_LEN, TEXT_WIDTH = 64, 32, 64, 22, 128
TARGET_RATIO = 3.0

CHILD = r'''
import json, sys, time, torch
from dalle2_pytorch import Unet
B, S, Z, L, W, target_params = (int(v) for v in sys.argv[1:7])

def make(dim, mults):
    torch.manual_seed(0)
    return Unet(dim=dim, image_embed_dim=Z, text_embed_dim=W, cond_dim=W, channels=3, dim_mults=mults,
                cond_on_image_embeds=True, cond_on_text_encodings=True)
shapes = [(dim, mults) for dim in range(8, 49, 8) for mults in ((1, 2), (1, 2, 2), (1, 2, 2, 2))]  # GroupNorm(8)
sizes = {shape: sum(p.numel() for p in make(*shape).parameters()) for shape in shapes}
dim, mults = min(sizes, key=lambda k: abs(sizes[k] - target_params))  # the size closest to ours
unet = make(dim, mults)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
x, target = torch.randn(B, 3, S, S), torch.randn(B, 3, S, S)
t = torch.randint(0, 1000, (B,))
z, text = torch.randn(B, Z), torch.randn(B, L, W)
out = {"params": sizes[(dim, mults)], "dim": dim, "dim_mults": list(mults)}
for precision in ("fp32", "bf16"):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(x, t, image_embed=z, text_encodings=text)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(); loss.backward(); opt.step()
    step(); step()
    n = 3 if precision == "fp32" else 6
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    out[f"images_per_s_{precision}"] = round(B * n / (time.perf_counter() - t0), 1)
print(json.dumps(out))
'''


def ensure_dalle2_venv() -> Path:
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import dalle2_pytorch"], capture_output=True).returncode == 0:
        return python
    print(f"installing {PACKAGE} into {VENV} (first run only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    ours = [p for p in site.getsitepackages() if "site-packages" in p][0]
    target = next((VENV / "lib").glob("python*/site-packages"))
    (target / "course_env.pth").write_text(ours + "\n")  # reuse this environment's torch, at lower priority
    subprocess.run([python, "-m", "pip", "install", "--quiet", PACKAGE], check=True)
    return python


def dalle2_speed(target_params: int) -> dict:
    python = ensure_dalle2_venv()
    args = [str(v) for v in (BATCH, SIZE, Z_DIM, TEXT_LEN, TEXT_WIDTH, target_params)]
    proc = subprocess.run([python, "-c", CHILD, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"the DALLE2-pytorch benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def our_speed() -> dict:
    import torch
    from unclip_lite.runtime import attention_backend
    from unclip_lite.config import get_preset
    from unclip_lite.decoder import Decoder
    from unclip_lite.runtime import autocast

    cfg = get_preset("course").decoder
    torch.manual_seed(0)
    model = Decoder(cfg, Z_DIM, TEXT_WIDTH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, target = torch.randn(BATCH, 3, SIZE, SIZE), torch.randn(BATCH, 3, SIZE, SIZE)
    t = torch.randint(0, 1000, (BATCH,)).float()
    z, text = torch.randn(BATCH, Z_DIM), torch.randn(BATCH, TEXT_LEN, TEXT_WIDTH)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    out = {"params": sum(p.numel() for p in model.parameters())}
    for precision in ("fp32", "bf16"):
        def step():
            with autocast("cpu", precision), attention_backend():
                loss = torch.nn.functional.mse_loss(model(x, t, z, text, mask).float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step()
        step()
        n = 10
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        out[f"images_per_s_{precision}"] = round(BATCH * n / (time.perf_counter() - t0), 1)
    return out


def bench() -> dict:
    ours = our_speed()
    theirs = dalle2_speed(ours["params"])
    best = lambda r: max(r["images_per_s_fp32"], r["images_per_s_bf16"])  # noqa: E731
    ratio = best(ours) / best(theirs)
    size_ratio = ours["params"] / theirs["params"]
    return {"ours": ours, "dalle2_pytorch": {**theirs, "package": PACKAGE},
            "batch": BATCH, "image_size": SIZE, "param_ratio": round(size_ratio, 3),
            "speed_ratio": round(ratio, 2), "target_ratio": TARGET_RATIO,
            "ok": ratio >= TARGET_RATIO and abs(size_ratio - 1) <= 0.10}


if __name__ == "__main__":
    result = bench()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decoder.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"our decoder trains at {result['speed_ratio']}x the images/s of DALLE2-pytorch's Unet "
          f"(parameters {result['ours']['params']:,} vs {result['dalle2_pytorch']['params']:,})")
    sys.exit(0 if result["ok"] else 1)
