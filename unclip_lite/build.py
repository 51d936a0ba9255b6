"""Every stage in course order: `ensure_all` trains what is missing in an artifacts folder (the
judge first, so that each stage that measures itself with the judge gets it passed in; on a
caption folder there is no judge) and `ensure_pipeline` returns the checked cascade. The stages
never train one another."""
from __future__ import annotations

from pathlib import Path

from .clip import ensure_clip
from .decoder import ensure_decoder
from .judge import judge_if_shapesworld
from .pipeline import PRIOR_KINDS, UnCLIP
from .prior import ensure_prior
from .upsampler import ensure_upsampler


def ensure_all(artifacts_dir: str | Path, preset, progress: bool = True) -> dict:
    """The judge, CLIP, the decoder, both priors and the upsampler from `artifacts_dir`, each
    trained first if missing or stale, in the course's order. Returns them by name. When the
    preset's data is a caption folder there is no judge ("judge": None): every stage trains on
    the folder and measures itself without one."""
    judge = judge_if_shapesworld(artifacts_dir, preset, progress=progress)
    clip = ensure_clip(artifacts_dir, preset, progress=progress)
    stages = {"judge": judge, "clip": clip,
              "decoder": ensure_decoder(artifacts_dir, preset, clip, judge, progress=progress)}
    for kind in PRIOR_KINDS:
        stages[f"prior_{kind}"] = ensure_prior(artifacts_dir, preset, clip, kind=kind, progress=progress)
    stages["upsampler"] = ensure_upsampler(artifacts_dir, preset, progress=progress)
    return stages


def ensure_pipeline(artifacts_dir: str | Path, preset, progress: bool = True) -> UnCLIP:
    """`ensure_all`, then the stages loaded through `UnCLIP.from_artifacts`, which checks that
    they fit together (the same CLIP, compatible configs)."""
    ensure_all(artifacts_dir, preset, progress=progress)
    return UnCLIP.from_artifacts(artifacts_dir)
