"""Text -> 64 px: seconds per image at batch 16, at the default step counts.

    python benchmarks/bench_pipeline.py [--artifacts build/artifacts]

Loads the course pipeline (`UnCLIP.from_artifacts`; run the course first), then times
`generate` on 16 val captions after one warm-up call, split into its stages: the prior, the
decoder (DDIM at its default steps, classifier-free guidance doubling the batch) and the
upsampler. The issue's target is at most 0.5 s per image. Writes build/bench/pipeline.json
and exits 1 if the measured time is over the target.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from unclip_lite.config import get_preset
from unclip_lite.data import rendered
from unclip_lite.pipeline import PipelineError, UnCLIP
from unclip_lite.shapes import ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench"
TARGET_S_PER_IMAGE = 0.5
BATCH = 16


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(artifacts: Path) -> dict:
    pipe = UnCLIP.from_artifacts(artifacts)
    captions = rendered(ShapesWorld("val", get_preset("course").world), BATCH)["captions"]
    z = pipe.priors["diffusion"].sample(captions)
    x32 = pipe.decode(z, captions, upsample=False, progress=False)
    stages = {
        "prior (diffusion)": timed(lambda: pipe.priors["diffusion"].sample(captions)),
        "decoder": timed(lambda: pipe.decode(z, captions, upsample=False, progress=False)),
        "upsampler": timed(lambda: pipe.upsampler.upsample(x32)),
        "text -> 64 px (generate)": timed(lambda: pipe.generate(captions, progress=False)),
    }
    per_image = {k: round(v / BATCH, 4) for k, v in stages.items()}
    return {"batch": BATCH, "threads": torch.get_num_threads(), "decoder_steps": pipe.decoder.cfg.sample_steps,
            "upsampler_steps": pipe.upsampler.cfg.sample_steps, "s_per_image": per_image,
            "target_s_per_image": TARGET_S_PER_IMAGE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=str(ROOT / "build" / "artifacts"))
    artifacts = Path(parser.parse_args().artifacts)
    try:
        result = bench(artifacts)
    except PipelineError as err:
        print(f"bench_pipeline: {err}\nTrain the course first (make course), then run this benchmark.", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["s_per_image"].items():
        print(f"{name:28} {s:.3f} s per image (batch {BATCH})")
    total = result["s_per_image"]["text -> 64 px (generate)"]
    print(f"target <= {TARGET_S_PER_IMAGE} s per image: {'met' if total <= TARGET_S_PER_IMAGE else 'NOT met'}")
    return 0 if total <= TARGET_S_PER_IMAGE else 1


if __name__ == "__main__":
    sys.exit(main())
