"""ShapesWorld rendering speed on one core (target: at least 2,000 scenes/s).

    python benchmarks/bench_shapes.py [--n 4000]

Writes build/bench/shapes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from unclip_lite.config import WorldConfig
from unclip_lite.shapes import ShapesWorld

OUT = Path(__file__).resolve().parents[1] / "build" / "bench"


def bench(n: int, repeats: int = 3) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    results = {}
    for name, cfg in {"default": WorldConfig(), "two_objects": WorldConfig(p_two_objects=1.0)}.items():
        world = ShapesWorld("train", cfg)
        world[0]  # warm the background cache
        best = 0.0
        for r in range(repeats):
            t0 = time.perf_counter()
            for i in range(r * n, (r + 1) * n):
                world[i]
            best = max(best, n / (time.perf_counter() - t0))
        results[name] = round(best, 1)
    return {"scenes_per_s_one_core": results, "n": n, "repeats": repeats, "target": 2000}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    out = bench(parser.parse_args().n)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "shapes.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
