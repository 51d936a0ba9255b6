"""Image manipulations through CLIP's latent space (paper §3): every one is a function of the
bipartite latent (z_i, x_T) and runs the decoder at 32 px, with an optional upsampler pass.

- `invert`: an image -> (z_i, x_T): CLIP's image encoder gives z_i, DDIM inversion of the decoder
  (conditioned on that z_i, no caption) gives x_T. Decoding (z_i, x_T) at eta=0 reconstructs it.
- `variations`: decode the inverted (z_i, x_T) with DDIM at eta > 0 (§3.1): what z_i holds is
  kept, the rest (here position and rotation) is re-drawn.
- `interpolate`: slerp between two z_i, with x_T fixed to one noise or slerped between the two
  inverted latents (§3.2).
- `text_diff`: move z_i toward a text diff z_d = norm(z_t - z_t0) by slerp (§3.3).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .clip import resize_uint8
from .decoder import IMAGE_SIZE


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation between a and b (..., D), along the last dimension.

    slerp(a, b, θ) = sin((1-θ)Ω)/sin Ω · a + sin(θΩ)/sin Ω · b with Ω the angle between a and b
    (computed on the unit vectors; the result has the norm interpolated linearly, so unit
    inputs give unit outputs and Gaussian noise keeps its scale). Nearly parallel inputs fall
    back to linear interpolation.
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    if bool((so.abs() < 1e-6).all()):
        direction = (1 - theta) * ua + theta * ub
    else:
        direction = (torch.sin((1 - theta) * omega) * ua + torch.sin(theta * omega) * ub) / so
    return direction * ((1 - theta) * na + theta * nb)


def slerp_flat(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """slerp over all but the batch dimension (for x_T images)."""
    return slerp(a.flatten(1), b.flatten(1), theta).view_as(a)


def to_model_images(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) or float [-1, 1] images -> float [-1, 1] at `size` px (the decoder's 32
    by default), resized the way the decoder's training images were (bicubic, antialiased)."""
    if images.dtype == torch.uint8:
        return resize_uint8(images, size).float().div(127.5).sub(1)
    x = images.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=x.shape[-1] > size).clamp(-1, 1)
    return x


def no_caption(pipe, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's 'caption dropped' input: one masked-out token per sample."""
    return torch.zeros(n, 1, pipe.clip.width), torch.zeros(n, 1, dtype=torch.bool)


def _out(pipe, x32: torch.Tensor, upsample: bool, seed: int) -> torch.Tensor:
    return pipe.upsampler.upsample(x32, seed=seed) if upsample and pipe.upsampler is not None else x32


@torch.no_grad()
def invert(pipe, images, steps: int | None = None, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_i (N, D), x_T (N, 3, 32, 32)) for images (uint8 or [-1, 1], any size).

    z_i comes from CLIP at its own input size (the full image, as in the decoder's training);
    x_T from DDIM inversion of the 32 px image under that z_i and no caption, at `guidance`.
    Decoding (z_i, x_T) reconstructs the image when it uses the same guidance and steps.
    """
    z = pipe.clip.encode_images(images)
    x = to_model_images(images)
    states, mask = no_caption(pipe, len(x))
    x_t = pipe.decoder.invert(x, z, states, mask, steps=steps, guidance=guidance)
    return z, x_t


@torch.no_grad()
def decode_latents(pipe, z: torch.Tensor, x_t: torch.Tensor, eta: float = 0.0, steps: int | None = None,
                   guidance: float = 1.0, seed: int = 0, upsample: bool = False) -> torch.Tensor:
    """Decode bipartite latents (z_i, x_T) without a caption; eta > 0 adds fresh noise per step.
    The default guidance (1, none) matches `invert`'s, so eta = 0 retraces the inversion."""
    states, mask = no_caption(pipe, len(z))
    x32 = pipe.decoder.sample(z, states, mask, steps=steps, guidance=guidance, eta=eta, noise=x_t,
                              generator=torch.Generator().manual_seed(seed))
    return _out(pipe, x32, upsample, seed)


def variations(pipe, image, n: int = 8, eta: float = 1.0, steps: int | None = None, guidance: float = 1.0,
               seed: int = 0, upsample: bool = False, latents: tuple | None = None) -> torch.Tensor:
    """`n` variations of one image (3, H, W) or (1, 3, H, W): its inverted (z_i, x_T), decoded
    with DDIM at `eta` (each variation a different noise stream)."""
    image = image[None] if image.ndim == 3 else image
    z, x_t = latents if latents is not None else invert(pipe, image, steps=steps)
    return decode_latents(pipe, z.expand(n, -1), x_t.expand(n, -1, -1, -1).contiguous(), eta=eta, steps=steps,
                          guidance=guidance, seed=seed, upsample=upsample)


def interpolate(pipe, z_a: torch.Tensor, z_b: torch.Tensor, thetas, mode: str = "fixed",
                x_t_a: torch.Tensor | None = None, x_t_b: torch.Tensor | None = None, steps: int | None = None,
                guidance: float = 1.0, seed: int = 0, upsample: bool = False) -> torch.Tensor:
    """Decode slerp(z_a, z_b, θ) for each θ (§3.2). mode "fixed": one x_T for the whole path (x_t_a,
    or noise drawn from `seed`); "inverted": x_T = slerp(x_t_a, x_t_b, θ) (both required)."""
    if mode not in ("fixed", "inverted"):
        raise ValueError(f"mode must be 'fixed' or 'inverted', got {mode!r}")
    z_a, z_b = z_a.reshape(1, -1), z_b.reshape(1, -1)
    if mode == "inverted" and (x_t_a is None or x_t_b is None):
        raise ValueError("mode 'inverted' needs both inverted latents x_t_a and x_t_b (see invert)")
    if x_t_a is None:
        x_t_a = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    thetas = [float(t) for t in thetas]
    z = torch.cat([slerp(z_a, z_b, t) for t in thetas])
    if mode == "fixed":
        x_t = x_t_a.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE).expand(len(thetas), -1, -1, -1).contiguous()
    else:
        x_t = torch.cat([slerp_flat(x_t_a.reshape(1, -1, IMAGE_SIZE, IMAGE_SIZE), x_t_b.reshape(1, -1, IMAGE_SIZE, IMAGE_SIZE), t)
                         for t in thetas])
    return decode_latents(pipe, z, x_t, steps=steps, guidance=guidance, seed=seed, upsample=upsample)


def text_diff_direction(pipe, from_caption: str, to_caption: str) -> torch.Tensor:
    """z_d = norm(z_t - z_t0), the text diff vector (§3.3), (D,)."""
    zt = pipe.clip.encode_texts([to_caption, from_caption])
    return F.normalize(zt[0] - zt[1], dim=-1)


def text_diff(pipe, z: torch.Tensor, x_t: torch.Tensor, from_caption: str, to_caption: str, thetas,
              steps: int | None = None, guidance: float = 1.0, seed: int = 0,
              upsample: bool = False) -> torch.Tensor:
    """Decode slerp(z_i, z_d, θ) for each θ with x_T fixed (the image's own inverted latent)."""
    z_d = text_diff_direction(pipe, from_caption, to_caption)
    thetas = [float(t) for t in thetas]
    zs = torch.cat([slerp(z.reshape(1, -1), z_d.reshape(1, -1), t) for t in thetas])
    x_ts = x_t.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE).expand(len(thetas), -1, -1, -1).contiguous()
    return decode_latents(pipe, zs, x_ts, steps=steps, guidance=guidance, seed=seed, upsample=upsample)


# ---------------------------------------------------------------------------------------------
# Measurements (notebook 06): every one is read by the judge, never by the decoder


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between images in [-1, 1], (N,)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def single_object(data: dict, n: int | None = None) -> dict:
    """The one-object scenes of a rendered split (the manipulations are measured on them), first n."""
    keep = [i for i, a in enumerate(data["attributes"]) if a["count"] == 1][:n]
    return {"images": data["images"][keep], "captions": [data["captions"][i] for i in keep],
            "attributes": [data["attributes"][i] for i in keep], "index": keep}


def object_mask(image: torch.Tensor, colour: str, sigma: float = 40.0, floor: float = 0.1) -> torch.Tensor:
    """Soft mask (H, W) of the pixels of `colour` in one image (3, H, W) in [-1, 1]: a Gaussian of
    the RGB distance to the palette colour (sigma in 0-255 units), with values under `floor` cut
    to zero (a large light background would otherwise add up to a pull on the centroid). The
    backgrounds are grey, so a saturated object stands out from every one of them."""
    from .shapes import COLOURS
    rgb = (image.float() + 1) * 127.5
    target = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None]
    m = torch.exp(-(rgb - target).pow(2).sum(0) / (2 * sigma ** 2))
    return ((m - floor) / (1 - floor)).clamp_min(0)


def estimate_rotation(images: torch.Tensor, predicted: list[dict], n_angles: int = 30) -> torch.Tensor:
    """The rotation (radians) of a one-object image, by analysis by synthesis at 32 px.

    The object is found by its colour (`object_mask`, with the judge's reading of the colour);
    its centre is the mask's centroid. Then the judge's reading of shape and size is drawn at that
    centre at `n_angles` rotations over the shape's symmetry period (`shapes.object_alpha`), and
    the rotation whose coverage is closest to the mask wins. NaN where rotation is undefined
    (circle, ring), where the judge reads two objects, or where no pixel has the colour.
    """
    from .shapes import SYMMETRY, object_alpha
    x = to_model_images(images)
    size = x.shape[-1]
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = torch.full((len(x),), float("nan"))
    for i, p in enumerate(predicted):
        order = SYMMETRY[p["shape"]]
        if not order or p["count"] != 1:
            continue
        mask = object_mask(x[i], p["colour"])
        total = float(mask.sum())
        if total < 2.0:
            continue
        cx, cy = float((mask.sum(0) * grid).sum()) / total, float((mask.sum(1) * grid).sum()) / total
        angles = [2 * math.pi / order * k / n_angles for k in range(n_angles)]
        obj = {"shape": p["shape"], "size": p["size"], "x": cx, "y": cy}
        cands = torch.from_numpy(np.stack([object_alpha({**obj, "rotation": a}, size) for a in angles]))
        err = (cands - mask).pow(2).flatten(1).sum(1)
        out[i] = angles[int(err.argmin())]
    return out


def group_spreads(images: torch.Tensor, predicted: list[dict], k: int, shapes: list[str]) -> tuple[list, list]:
    """Per group of k consecutive samples (one scene's variations, one caption's samples):

    - the RMS distance (32 px pixels) of the judged object centres from their mean;
    - the circular std (degrees) of `estimate_rotation` over the samples the judge reads as the
      group's shape `shapes[g]` (another shape's angle lives on another period); NaN where the
      shape has no rotation or fewer than two samples qualify.
    """
    from .shapes import SYMMETRY
    pos = torch.tensor([[p["objects"][0]["x"], p["objects"][0]["y"]] for p in predicted]).view(-1, k, 2)
    position = ((pos - pos.mean(1, keepdim=True)).pow(2).sum(-1).mean(1).sqrt() * IMAGE_SIZE).tolist()
    read_as_named = torch.tensor([p["shape"] == shapes[i // k] for i, p in enumerate(predicted)])
    rot = torch.where(read_as_named, estimate_rotation(images, predicted), torch.nan).view(-1, k)
    rotation = [circular_spread(rot[g], SYMMETRY[s]) if SYMMETRY.get(s) else float("nan") for g, s in enumerate(shapes)]
    return position, rotation


def circular_spread(angles: torch.Tensor, order: int) -> float:
    """Circular standard deviation (degrees) of rotations that are only defined modulo 2π/order."""
    a = angles[~torch.isnan(angles)].double() * order
    if len(a) < 2:
        return float("nan")
    r = torch.sqrt(torch.cos(a).mean() ** 2 + torch.sin(a).mean() ** 2).clamp(1e-12, 1.0)
    return float(torch.sqrt(-2 * torch.log(r)) / order * 180 / math.pi)


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
    from .shapes import SYMMETRY
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
    from .shapes import COLOURS, SHAPES
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


def without_images(result):
    """A study's result without its image tensors (what goes into metrics.json)."""
    if isinstance(result, dict):
        return {k: without_images(v) for k, v in result.items() if not isinstance(v, torch.Tensor)}
    if isinstance(result, (list, tuple)):
        return [without_images(v) for v in result]
    return result
