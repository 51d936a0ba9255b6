"""What CLIP's embeddings keep (notebook 04): linear probes of the attributes captions name and of
the details they leave out, the modality gap's axis, and how close embeddings that share a
description sit within and across the two modalities."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..clip import caption_ids, caption_keys, scene_keys
from ..shapes import SYMMETRY, match_matrix
from ..stats import linear_probe


def what_it_keeps(features: dict[str, torch.Tensor], data: dict) -> dict:
    """Linear probes of one-object scenes' attributes from several image representations.

    `features` maps a name to (N, D) features of `data`'s images, e.g. {"z_i": CLIP image
    embeddings, "judge": the judge's features, "pixels": `pixels(data, 16)`}. Returns
    {target: {name: score, ..., "score": "accuracy" | "R^2"}} for the attributes captions name
    (shape, colour, size, background: accuracy) and the details they leave out (x and y
    position, and rotation as (cos, sin) of symmetry x angle on shapes whose rotation shows: R^2).
    """
    one = [i for i, a in enumerate(data["attributes"]) if a["count"] == 1]
    objs = [data["attributes"][i]["objects"][0] for i in one]
    feats = {name: torch.as_tensor(f)[one] for name, f in features.items()}
    targets = {k: [o[k] for o in objs] for k in ("shape", "colour", "size")}
    targets["background"] = [data["attributes"][i]["background"] for i in one]
    targets["x position"] = [o["x"] for o in objs]
    targets["y position"] = [o["y"] for o in objs]
    out = {}
    for name, target in targets.items():
        out[name] = {f: linear_probe(x, target) for f, x in feats.items()}
        out[name]["score"] = "accuracy" if isinstance(target[0], str) else "R^2"
    rotated = [k for k, o in enumerate(objs) if SYMMETRY[o["shape"]]]
    angle = np.array([SYMMETRY[objs[k]["shape"]] * objs[k]["rotation"] for k in rotated])
    rot = np.stack([np.cos(angle), np.sin(angle)], 1)
    out["rotation"] = {f: linear_probe(x[rotated], rot) for f, x in feats.items()}
    out["rotation"]["score"] = "R^2"
    return out


def gap_axis(image_embed: torch.Tensor, text_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each embedding's coordinate along the line joining the two modalities' centroids."""
    axis = F.normalize(image_embed.mean(0) - text_embed.mean(0), dim=0)
    return image_embed @ axis, text_embed @ axis


def description_similarity(image_embed: torch.Tensor, text_embed: torch.Tensor, data: dict) -> dict:
    """Mean cosine between embeddings that share a description, within and across modalities.

    "image_image": an image and another image its caption also describes; "text_image": a
    caption and the images it describes. If z_t could stand in for z_i, the two would be close.
    """
    keys = caption_keys(data["captions"], caption_ids(data))
    match = torch.from_numpy(np.asarray(match_matrix(keys, scene_keys(data))))
    ii = image_embed @ image_embed.T
    other = match & ~torch.eye(len(match), dtype=torch.bool)
    ti = text_embed @ image_embed.T
    return {"image_image": float(ii[other].mean()), "text_image": float(ti[match].mean()),
            "pairs": int(other.sum())}
