"""Measurements that need no judge, for any data: how well generated images fit their captions
and how close they come to real images, read by a CLIP model.

- **CLIP score** (Hessel et al. 2021): 100 x the cosine between a generated image's CLIP image
  embedding and its caption's text embedding, per image. Higher is better; compare it with the
  same measure on real val images and their own captions (the ceiling) and on real images with
  shuffled captions (chance).
- **Retrieval**: for each caption, the generated images ranked by cosine to it; a hit when the
  top-1 (or a top-k) image was generated from that same caption text. Chance is the share of
  images with that caption.
- **Fréchet distance on CLIP image features** (the FID recipe with CLIP as the feature network):
  generated against real val images, in a PCA basis of the real features (`stats.frechet_ci`),
  with a bootstrap band. Lower is closer.

The reading CLIP can be the course's own (trained on the same data: it may share the
generator's blind spots) or any open_clip model the user points to
(`clip_model.load_clip(name, pretrained=path)`). Every number comes with a bootstrap 95% interval.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import stats


def clip_scores(clip, images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """Per image: 100 x cos(CLIP image embedding, caption's text embedding), (N,)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: one caption per image")
    return _scores(clip.encode_images(images), clip, captions)


def _scores(image_embed: torch.Tensor, clip, captions: list[str]) -> np.ndarray:
    return (100 * (image_embed * clip.encode_texts(list(captions))).sum(1)).numpy().astype(np.float64)


def retrieval_hits(clip, images: torch.Tensor, captions: list[str], k: int = 5) -> dict[str, np.ndarray]:
    """Caption -> image retrieval among the generated images. Per distinct caption: "top1" and
    f"top{k}" hits (0/1), and "chance" (the share of images generated from that caption)."""
    return _retrieval(clip.encode_images(images), clip, captions, k)


def _retrieval(image_embed: torch.Tensor, clip, captions: list[str], k: int) -> dict[str, np.ndarray]:
    distinct = sorted(set(captions))
    owner = np.array([distinct.index(c) for c in captions])
    ranked = (clip.encode_texts(distinct) @ image_embed.T).argsort(dim=1, descending=True).numpy()  # (captions, images)
    top1 = np.array([owner[ranked[j, 0]] == j for j in range(len(distinct))], dtype=np.float64)
    topk = np.array([(owner[ranked[j, :k]] == j).any() for j in range(len(distinct))], dtype=np.float64)
    chance = np.array([(owner == j).mean() for j in range(len(distinct))])
    return {"top1": top1, f"top{k}": topk, "chance": chance}


def frechet_clip(clip, images: torch.Tensor, real: torch.Tensor, dims: int = 16, k: int = 1,
                 seed: int = 0) -> tuple[float, float, float]:
    """The Fréchet distance between the CLIP image features of `images` and of `real` images, in
    the first `dims` principal components of the real features, with a bootstrap band (groups of
    `k` samples of one caption resampled together)."""
    return _frechet(clip.encode_images(images), clip.encode_images(real), dims, k, seed)


def _frechet(fake: torch.Tensor, ref: torch.Tensor, dims: int, k: int, seed: int) -> tuple[float, float, float]:
    fake, ref = fake.double(), ref.double()
    dims = min(dims, ref.shape[1], len(ref) - 1)
    return stats.frechet_ci(fake, ref, stats.pca_basis(ref, dims), seed=seed, k=k)


def judge_free_report(clip, images: torch.Tensor, captions: list[str], real: dict, k: int = 1, seed: int = 0) -> dict:
    """Every judge-free measure of `images` generated from `captions` (k samples per caption, in
    caption order), against `real` = {"images", "captions"} (a val split). Intervals are bootstrap
    95%; "real" rows are the same measures on the real images (their own captions: the ceiling;
    shuffled: chance); "clip_scores" keeps the per-image scores (for `agreement`). Each image set
    is encoded once."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: one caption per image")
    fake, ref = clip.encode_images(images), clip.encode_images(real["images"])
    shuffled = list(np.random.default_rng(seed).permutation(real["captions"]))
    scores = _scores(fake, clip, captions)
    return {"n": len(images),
            "clip_score": stats.summarise(scores),
            "clip_score_real": stats.summarise(_scores(ref, clip, real["captions"])),
            "clip_score_shuffled": stats.summarise(_scores(ref, clip, shuffled)),
            "retrieval": {name: stats.summarise(v) for name, v in _retrieval(fake, clip, captions, 5).items()},
            "frechet_clip": _frechet(fake, ref, 16, k, seed),
            "clip_scores": [round(float(v), 4) for v in scores]}


def agreement(scores, correct) -> dict:
    """How far a judge-free per-image score agrees with the judge's right/wrong reading:
    the mean score of images the judge reads right and of those it reads wrong, and the AUROC
    (the chance that a right image scores above a wrong one; 0.5 is no agreement)."""
    s, c = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    right, wrong = s[c], s[~c]
    if len(right) == 0 or len(wrong) == 0:
        return {"right": stats.summarise(right), "wrong": stats.summarise(wrong), "auroc": float("nan")}
    both = np.concatenate([right, wrong])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties at their average (Mann-Whitney)
    auroc = (ranks[: len(right)].sum() - len(right) * (len(right) + 1) / 2) / (len(right) * len(wrong))
    return {"right": stats.summarise(right), "wrong": stats.summarise(wrong), "auroc": float(auroc),
            "n_right": int(len(right)), "n_wrong": int(len(wrong))}
