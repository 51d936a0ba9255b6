"""Write data/example/: a tiny "your own data" folder (PNG images + captions.jsonl), generated
from ShapesWorld's val split, to show the format and to test the folder loader.

    python scripts/make_example_data.py [--out data/example] [--n 24]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from unclip_lite.config import WorldConfig
from unclip_lite.shapes import ShapesWorld


def write_example(out: Path, n: int = 24, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld("val", WorldConfig(seed=seed))
    lines = []
    for i in range(n):
        sample = world[i]
        name = f"scene_{i:03d}.png"
        Image.fromarray(sample.image).save(out / name, optimize=True)
        lines.append(json.dumps({"file": name, "caption": sample.caption, "attributes": sample.attributes}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "example")
    parser.add_argument("--n", type=int, default=24)
    args = parser.parse_args()
    print(f"wrote {write_example(args.out, args.n)}")
