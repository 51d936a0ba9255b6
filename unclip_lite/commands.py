"""`python -m unclip_lite train STAGE`: train (or load) one stage into an artifacts folder.

The same `ensure_*` calls the notebooks make, so a stage trained here is the one a notebook loads,
and a notebook run later finds it. `--set` changes any preset field by its dotted path
(`decoder.train.steps=4000`); the change is part of the stage's stored config, so a later run
with other settings moves this artifact aside instead of mixing the two.

Under torchrun the same command trains data-parallel (train.py: DDP, gloo on CPU, nccl on CUDA):

    torchrun --nproc-per-node 2 -m unclip_lite train decoder --preset gpu --artifacts build/artifacts
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .build import ensure_all
from .clip import ensure_clip
from .config import PRESETS, check_ranges, get_preset, set_field
from .data import NeedsShapesWorld
from .decoder import ensure_decoder
from .judge import ensure_judge, judge_if_shapesworld
from .prior import ensure_prior
from .runtime import init_distributed
from .upsampler import ensure_upsampler

STAGES = ("all", "judge", "clip", "decoder", "decoder-caption-only", "prior", "ar-prior", "upsampler")  # all: build.ensure_all


def _parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(PRESETS))
    ap = argparse.ArgumentParser(
        prog="python -m unclip_lite train",
        description="Train one stage (and any earlier stage it needs) into an artifacts folder.",
        epilog=f"stages: {', '.join(STAGES)}; presets: {presets}. Example: python -m unclip_lite train decoder "
               "--preset course --set decoder.train.steps=4000 --set decoder.train.device=cuda. "
               "Several processes: torchrun --nproc-per-node N -m unclip_lite train STAGE ... (README: scaling out)")
    ap.add_argument("stage", choices=STAGES, help="the stage to train (all: every stage, in the course order)")
    ap.add_argument("--preset", default="course", choices=sorted(PRESETS), help="the preset (default: course)")
    ap.add_argument("--artifacts", type=Path, default=Path("build/artifacts"), help="the artifacts folder")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="train on a caption folder (images + captions.jsonl or captions.csv) instead of ShapesWorld; "
                         "the same as --set data.source=DIR. The judge needs ShapesWorld")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                    help="change a preset field, e.g. decoder.train.steps=4000 (repeatable)")
    ap.add_argument("--retrain", action="store_true", help="train even if a matching artifact exists")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def apply_overrides(preset, overrides: list[str]):
    """The preset with every "path=value" of `overrides` applied (`config.set_field`)."""
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected PATH=VALUE, e.g. decoder.train.steps=4000")
        try:
            preset = set_field(preset, path.strip(), value.strip())
            check_ranges(preset)
        except ValueError as err:
            raise SystemExit(f"--set {item!r}: {err}") from None
    return preset


def train_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    preset = apply_overrides(get_preset(args.preset), ([f"data.source={args.data}"] if args.data else []) + args.overrides)
    try:
        return _train(args, preset)
    except NeedsShapesWorld as err:  # e.g. `train judge --data DIR`: the message says what to use instead
        raise SystemExit(str(err)) from None


def _train(args, preset) -> int:
    rank, world_size = init_distributed(preset.judge.train.device)  # under torchrun: every rank runs this
    progress, folder = not args.no_progress, args.artifacts
    t0 = time.perf_counter()
    if args.stage == "all":  # every stage in course order (no judge on a caption folder)
        if args.retrain:
            raise SystemExit("--retrain applies to one stage; name it (e.g. train decoder --retrain)")
        trained = ensure_all(folder, preset, progress=progress)["decoder"]
    elif args.stage == "judge":
        trained = ensure_judge(folder, preset, retrain=args.retrain, progress=progress)
    elif args.stage == "upsampler":
        trained = ensure_upsampler(folder, preset, retrain=args.retrain, progress=progress)
    else:
        clip = ensure_clip(folder, preset, retrain=args.retrain and args.stage == "clip", progress=progress)
        trained = clip
        if args.stage.startswith("decoder"):
            judge = judge_if_shapesworld(folder, preset, progress=progress)  # the decoder measures itself with it
            trained = ensure_decoder(folder, preset, clip, judge, caption_only=args.stage == "decoder-caption-only",
                                     retrain=args.retrain, progress=progress)
        elif args.stage in ("prior", "ar-prior"):
            trained = ensure_prior(folder, preset, clip, "diffusion" if args.stage == "prior" else "ar",
                                   retrain=args.retrain, progress=progress)
    metrics = getattr(trained, "metrics", {}) or {}
    summary = {"stage": args.stage, "preset": preset.name, "artifacts": str(folder), "seconds": round(time.perf_counter() - t0, 1),
               "train": {k: metrics.get("train", {}).get(k) for k in ("steps", "wall_s", "samples_per_s", "precision", "device")},
               "world_size": world_size}
    if rank == 0:
        print(json.dumps(summary, indent=1))
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0
