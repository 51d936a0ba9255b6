"""Write docs/pipeline.png: the course map that opens every notebook (`plotting.pipeline_map`),
with no box highlighted, for the README.

    python scripts/make_map.py [--out docs/pipeline.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from unclip_lite.plotting import pipeline_map  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "pipeline.png"))
    out = Path(ap.parse_args().out)
    fig = pipeline_map(title="unCLIP, as the course builds it: each box names the notebook that builds it")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
