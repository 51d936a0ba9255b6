"""The latent manipulations of `manipulate`, measured (notebooks 10 and 11): how well inversion
reconstructs, what variations keep and re-draw, whether a text diff changes one attribute and
keeps the rest, and how interpolations travel. Each study calls the operations users call."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import estimate_rotation, group_spreads
from ..images import IMAGE_SIZE, psnr, to_model_images
from ..manipulate import decode_latents, interpolate, invert, slerp
from ..pipeline import check_sampling
from ..runtime import check_arg
from ..shapes import COLOURS, SHAPES, SYMMETRY


def inversion_study(pipe, data: dict, steps: int | None = None) -> dict:
    """Invert images to (z_i, x_T) and decode them back at eta = 0: PSNR at 32 px per image."""
    z, x_t = invert(pipe, data["images"], steps=steps)
    back = decode_latents(pipe, z, x_t, steps=steps)
    values = psnr(back, to_model_images(data["images"]))
    return {"n": len(values), "steps": steps or pipe.decoder.cfg.sample_steps, "psnr": values.tolist(),
            "mean_psnr": float(values.mean()), "images": back}


def variation_study(pipe, judge, data: dict, n_variations: int = 8, eta: float = 1.0, steps: int | None = None,
                    seed: int = 0) -> dict:
    """`n_variations` variations of each one-object scene (§3.1), read by the judge.

    "keep_shape", "keep_colour", "keep_both": the share of variations whose judged shape / colour
    is the scene's. "position_spread_px": per scene, the RMS distance (32 px pixels) of the
    judged object centres from their mean, averaged over scenes; "rotation_spread_deg": the
    circular std of `estimate_rotation` per scene (rotatable shapes only, over the variations the
    judge reads as the scene's shape), averaged. The estimators' own error on the real scenes
    ("position_error_px", "rotation_error_deg") is a floor a spread has to clear; on the decoder's
    blurrier outlines the estimators err more, so treat it as a lower bound.
    "keep_both_per_scene" is the share per scene, for intervals that resample scenes.
    """
    check_arg("n_variations", n_variations, minimum=1, integer=True, none_ok=False)
    check_sampling(seed=seed, steps=steps, eta=eta)
    z, x_t = invert(pipe, data["images"], steps=steps)
    n = len(z)
    varied = torch.cat([decode_latents(pipe, z[i:i + 1].expand(n_variations, -1),
                                       x_t[i:i + 1].expand(n_variations, -1, -1, -1).contiguous(),
                                       eta=eta, steps=steps, seed=seed + i) for i in range(n)])
    preds = judge.predict(varied)
    truth = [a for a in data["attributes"] for _ in range(n_variations)]
    shape_ok = torch.tensor([p["shape"] == t["shape"] for p, t in zip(preds, truth)])
    colour_ok = torch.tensor([p["colour"] == t["colour"] for p, t in zip(preds, truth)])
    pos_spread, rot_spread = group_spreads(varied, preds, n_variations, [a["shape"] for a in data["attributes"]])
    rot_spread = [r for r in rot_spread if not math.isnan(r)]
    # the estimators on the real scenes: how far a reading is off when nothing varies
    real = judge.predict(data["images"])
    true_pos = torch.tensor([[a["objects"][0]["x"], a["objects"][0]["y"]] for a in data["attributes"]])
    read_pos = torch.tensor([[p["objects"][0]["x"], p["objects"][0]["y"]] for p in real])
    real_rot = estimate_rotation(data["images"], real)
    rot_err = []
    for r, a in zip(real_rot.tolist(), data["attributes"]):
        order = SYMMETRY[a["shape"]]
        if order and not math.isnan(r):
            d = (r - a["objects"][0]["rotation"]) % (2 * math.pi / order)
            rot_err.append(min(d, 2 * math.pi / order - d) * 180 / math.pi)
    return {"n_scenes": n, "n_variations": n_variations, "eta": eta, "steps": steps or pipe.decoder.cfg.sample_steps,
            "keep_shape": float(shape_ok.float().mean()), "keep_colour": float(colour_ok.float().mean()),
            "keep_both": float((shape_ok & colour_ok).float().mean()),
            "keep_both_per_scene": (shape_ok & colour_ok).float().view(n, n_variations).mean(1).tolist(),
            "position_spread_px": float(np.mean(pos_spread)),
            "rotation_spread_deg": float(np.mean(rot_spread)) if rot_spread else float("nan"),
            "position_error_px": float((read_pos - true_pos).norm(dim=1).mean() * IMAGE_SIZE),
            "rotation_error_deg": float(np.mean(rot_err)) if rot_err else float("nan"),
            "images": varied}


def edit_captions(attributes: dict, attribute: str) -> tuple[str, str, str]:
    """(from caption, to caption, target value) for a text diff that changes one object's
    `attribute` ("colour" or "shape") to the next value in the vocabulary's order."""
    values = list(COLOURS) if attribute == "colour" else list(SHAPES) if attribute == "shape" else None
    if values is None:
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    target = values[(values.index(attributes[attribute]) + 1) % len(values)]
    edited = {**attributes, attribute: target}
    return (f"a {attributes['colour']} {attributes['shape']}", f"a {edited['colour']} {edited['shape']}", target)


def text_diff_study(pipe, judge, data: dict, attribute: str = "colour", thetas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                    steps: int | None = None) -> dict:
    """Edit every one-object scene by a text diff that changes `attribute` (`edit_captions`), over
    a sweep of θ, with x_T fixed to the scene's inverted latent (§3.3).

    Per θ: "success" (the judge reads the target value), "kept" (it reads the scene's own values
    of the other attributes: shape or colour, size, background) and "both". "best" is the θ with
    the highest "both".
    """
    edits = [edit_captions(a, attribute) for a in data["attributes"]]
    z, x_t = invert(pipe, data["images"], steps=steps)
    texts = pipe.clip.encode_texts([e[1] for e in edits] + [e[0] for e in edits])
    z_d = F.normalize(texts[:len(edits)] - texts[len(edits):], dim=-1)
    others = [k for k in ("shape", "colour", "size", "background") if k != attribute]
    rows, images = [], []
    for theta in thetas:
        out = decode_latents(pipe, slerp(z, z_d, float(theta)), x_t, steps=steps)
        preds = judge.predict(out)
        success = torch.tensor([p[attribute] == e[2] for p, e in zip(preds, edits)])
        kept = torch.tensor([all(p[k] == a[k] for k in others) for p, a in zip(preds, data["attributes"])])
        rows.append({"theta": float(theta), "success": float(success.float().mean()), "kept": float(kept.float().mean()),
                     "both": float((success & kept).float().mean()), "both_hits": (success & kept).float().tolist()})
        images.append(out)
    best = max(rows, key=lambda r: r["both"])
    return {"attribute": attribute, "n": len(edits), "steps": steps or pipe.decoder.cfg.sample_steps, "sweep": rows,
            "best": {k: v for k, v in best.items() if k != "both_hits"}, "edits": edits,
            "images": torch.stack(images, 1)}  # (N, len(thetas), 3, 32, 32)


def interpolation_study(pipe, judge, data: dict, n_pairs: int = 8, thetas=None, steps: int | None = None,
                        seed: int = 0) -> dict:
    """The judge's reading along slerp(z_a, z_b, θ) for pairs of one-object scenes that differ in
    shape and colour (§3.2), in both x_T modes. Per mode and θ: the share of decodes read with A's
    shape, B's shape, A's colour and B's colour."""
    check_arg("n_pairs", n_pairs, minimum=1, integer=True, none_ok=False)
    check_sampling(seed=seed, steps=steps)
    thetas = [i / 8 for i in range(9)] if thetas is None else [float(t) for t in thetas]
    attrs = data["attributes"]
    pairs, used = [], set()
    for i in range(len(attrs)):
        for j in range(i + 1, len(attrs)):
            if len(pairs) < n_pairs and i not in used and j not in used and \
                    attrs[i]["shape"] != attrs[j]["shape"] and attrs[i]["colour"] != attrs[j]["colour"]:
                pairs.append((i, j))
                used |= {i, j}
    if not pairs:
        raise ValueError("no pair of scenes differs in both shape and colour")
    z, x_t = invert(pipe, data["images"], steps=steps)
    out = {"n_pairs": len(pairs), "thetas": thetas, "pairs": pairs}
    for mode in ("fixed", "inverted"):
        reads = {k: [] for k in ("A shape", "B shape", "A colour", "B colour")}
        strips = []
        for a, b in pairs:
            imgs = interpolate(pipe, z[a], z[b], thetas, mode=mode, x_t_a=x_t[a:a + 1], x_t_b=x_t[b:b + 1],
                               steps=steps, seed=seed)
            strips.append(imgs)
            preds = judge.predict(imgs)
            for side, k in ((a, "A"), (b, "B")):
                reads[f"{k} shape"].append([p["shape"] == attrs[side]["shape"] for p in preds])
                reads[f"{k} colour"].append([p["colour"] == attrs[side]["colour"] for p in preds])
        out[mode] = {k: torch.tensor(v, dtype=torch.float).mean(0).tolist() for k, v in reads.items()}
        out[mode]["images"] = torch.stack(strips)  # (pairs, len(thetas), 3, 32, 32)
    return out
