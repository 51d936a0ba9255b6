"""Comparisons of the stages, beyond each stage's own metrics: the two priors side by side
(notebook 07) and the whole cascade read by the judge and the strict reader (notebook 09)."""
from __future__ import annotations

import torch

from .. import geometry
from ..clip_model import ClipModel
from ..decoder import decode_split
from ..judge import accuracy_from_hits, caption_hits
from ..pipeline import UnCLIP
from ..shapes import parse_caption
from ..stats import bootstrap_ci


def variants(metrics: dict) -> dict[str, dict]:
    """{variant name: {"val": {...}, "heldout": {...}}} of the per-caption metrics in one prior's
    `metrics["eval"]` (e.g. "best_of_1", "best_of_2"; "top_half", "full_distribution"; and
    "baseline_text_embed": z_t used as z_i)."""
    ev = metrics["eval"]
    names = [k for k in ev["val"] if isinstance(ev["val"][k], dict)]
    return {name: {split: ev[split][name] for split in ("val", "heldout")} for name in names}


def summary_rows(priors: dict[str, dict], digits: int = 3) -> list[dict]:
    """One row per (prior variant, split): nearest-image hit rate and cosine to the true z_i,
    each as (mean, low, high) with a bootstrap 95% interval. `priors` maps a label to metrics."""
    rows = []
    for label, metrics in priors.items():
        for name, splits in variants(metrics).items():
            for split, values in splits.items():
                rows.append({"prior": label, "variant": name, "split": split,
                             **{key: tuple(round(v, digits) for v in bootstrap_ci(values[key]))
                                for key in ("nearest_hit", "cosine")}})
    return rows


def decode_and_judge(decoder, clip: ClipModel, judge, captions: list[str], z: torch.Tensor,
                     steps: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode z_i (N, D) with their captions (fixed noise per seed) and let the judge read the
    images: (images (N, 3, 32, 32) in [-1, 1], hits (N,) bool: every shape, colour and size the
    caption names read right, see `judge.caption_hits`)."""
    images = decode_split(decoder, clip, {"captions": list(captions)}, steps=steps, seed=seed, z=z)
    return images, caption_hits(images, captions, judge)["joint"]


def verdict(diff_hit: tuple, diff_cos: tuple, ratio_train: float, ratio_sample: float) -> str:
    """A sentence on which prior wins on fidelity per unit of compute, claiming a difference only
    where a paired 95% interval (mean, low, high) of diffusion minus AR excludes zero.
    `ratio_train` and `ratio_sample` are diffusion / AR compute (FLOPs)."""
    def side(ci):
        return "diffusion" if ci[1] > 0 else "AR" if ci[2] < 0 else None
    sides = {side(diff_hit), side(diff_cos)} - {None}
    if len(sides) == 2:
        fidelity, winner = "the two fidelity measures disagree (nearest hit and cosine favour different priors)", None
    elif sides:
        winner = sides.pop()
        fidelity = f"the {winner} prior is more faithful (the paired interval excludes zero)"
    else:
        fidelity, winner = "no fidelity difference is detectable at this sample size", None
    cheaper_train = "diffusion" if ratio_train < 1 else "AR"
    cost = (f"the {cheaper_train} prior used less training compute ({ratio_train:.2f}x diffusion/AR) and the "
            f"{'diffusion' if ratio_sample < 1 else 'AR'} prior less per sample ({ratio_sample:.2f}x)")
    if winner is not None and winner == cheaper_train:
        return f"{winner} wins on fidelity per unit of training compute: {fidelity}, and {cost}."
    if winner is None and sides == set():
        return (f"Fidelity per unit of compute favours the cheaper prior only by its cost: {fidelity}; {cost}.")
    return (f"No winner per unit of compute: {fidelity}, but {cost}; one model size each cannot say "
            "which would win at equal compute.")


def evaluate_pipeline(pipe: UnCLIP, judge, captions: list[str], prior: str = "diffusion", seed: int = 0,
                      progress: bool = False, **generate_kwargs) -> dict:
    """Generate one image per caption and let the judge read it against what the caption names.

    Returns {"accuracy": per-attribute accuracy, "joint" (every named shape, colour and size right
    at once) and "strict_shape" (shape by `geometry.strict_accuracy`), "joint_hits": per-caption
    0/1 (for bootstrap intervals), "images": (N, 3, H, W)}.
    """

    images = pipe.generate(captions, prior=prior, seed=seed, progress=progress, **generate_kwargs)
    hits = caption_hits(images, captions, judge)
    strict = geometry.strict_accuracy(images, [parse_caption(c) for c in captions])
    return {"accuracy": {**accuracy_from_hits(hits), "strict_shape": strict["shape"]},
            "joint_hits": hits["joint"].float(), "images": images}
