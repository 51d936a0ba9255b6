"""The strict geometric reading of an image: analysis by synthesis with the world's own renderer.

The judge is a CNN, and a CNN trained on real scenes can read a round blob of the right colour
and size as a square. This reader cannot be talked into that: for each object a caption (or a
scene) names, it takes the mask of the named colour (`object_mask`), then draws every shape of
the world at every size and at `n_angles` rotations over the shape's symmetry period
(`shapes.object_alpha`), centred on the mask's centroid (to a quarter pixel, then searched over
+-1 px), and keeps the template with the highest soft IoU with the mask. The object's shape is
read right only when that best template has the named shape *and* an IoU of at least
`MIN_IOU`: a blob matches a circle best, and matches no template well.

It reads the real 32 px scenes of val 100% right (tests/test_geometry.py), so a miss on a
generated image is the image's fault, not the reader's.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .images import IMAGE_SIZE, to_float, to_model_images
from .shapes import COLOURS, SHAPES, SIZES, SYMMETRY, object_alpha

SIZE = 32  # the reader works at the decoder's resolution
WINDOW = 21  # templates and masks are compared in a WINDOW x WINDOW crop around the object
OFFSETS = (-0.25, 0.25)  # sub-pixel template centres (fractions of a pixel)
MIN_IOU = 0.7  # below this no template explains the mask (real 32 px scenes: 100% read right, lowest IoU 0.76 of 1,800 objects)
MIN_PIXELS = 4.0  # a colour mask with less mass than this is no object at all
FLOOR = 0.1  # coverage under this is noise, not an object's edge


def _coverage(rgb: torch.Tensor, c: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per pixel of rgb (3, H, W) in 0-255: the share a of colour c in the least-squares mix
    pixel = a * c + b * (1, 1, 1), damped where no such mix explains the pixel (residual >> tolerance)."""
    u = torch.ones(3, device=rgb.device)
    cc, cu, uu = float(c @ c), float(c @ u), float(u @ u)
    pc, pu = torch.einsum("chw,c->hw", rgb, c), rgb.sum(0)
    det = cc * uu - cu * cu
    a = (uu * pc - cu * pu) / det
    b = (cc * pu - cu * pc) / det
    residual = (rgb - a * c[:, None, None] - b * u[:, None, None]).pow(2).sum(0)
    return a.clamp(0, 1) * torch.exp(-residual / (2 * tolerance ** 2))


def object_mask(image: torch.Tensor, colour: str, tolerance: float = 30.0) -> torch.Tensor:
    """The coverage (H, W) in [0, 1] of `colour` in one image (3, H, W) in [-1, 1].

    Every background of the world is grey, and an antialiased edge pixel is a mix of the object's
    colour c and a grey: pixel = a * c + b * (1, 1, 1). Least squares gives a, the coverage, per
    pixel; a pixel that no such mix explains (another colour) gets coverage 0, smoothly. A
    generated image draws the palette colour only approximately, so c is first found with a wide
    tolerance, then re-estimated as the mean colour of the pixels it clearly covers, and the
    coverage is computed again with the object's own colour; a faint coverage spread over the
    whole image (a tinted background) is removed."""
    rgb = (image.float() + 1) * 127.5  # (3, H, W)
    c = torch.tensor(COLOURS[colour], dtype=torch.float32, device=rgb.device)
    first = _coverage(rgb, c, 2 * tolerance)
    core = first > 0.6
    if int(core.sum()) >= 3:
        own = rgb[:, core].mean(1)
        nearest = min(COLOURS, key=lambda k: float((torch.tensor(COLOURS[k], dtype=torch.float32) - own.cpu()).norm()))
        if nearest == colour:  # never drift to a neighbouring palette colour (orange -> yellow)
            c = own
    a = _coverage(rgb, c, tolerance)
    # a generated background is not exactly grey, which shows as a faint uniform coverage: the
    # object covers well under half the image, so the median is that level; remove it, and specks
    level = float(a.median())
    a = ((a - level) / (1 - level)).clamp(0, 1)
    return torch.where(a < FLOOR, torch.zeros_like(a), a)


@lru_cache(maxsize=4)
def template_bank(n_angles: int = 24) -> tuple[torch.Tensor, list[tuple[str, str, float]]]:
    """Every (shape, size, rotation) drawn at the window's centre (plus sub-pixel offsets):
    templates (T, len(OFFSETS)**2, WINDOW, WINDOW) float32 and their labels [(shape, size, rotation)]."""
    half = WINDOW // 2
    lo = SIZE // 2 - half  # the window's first pixel in the 32 px canvas, so its centre pixel is SIZE // 2
    templates, labels = [], []
    for shape in SHAPES:
        order = SYMMETRY[shape]
        angles = [2 * math.pi / order * k / n_angles for k in range(n_angles)] if order else [0.0]
        for size in SIZES:
            for angle in angles:
                shifted = []
                for dy in OFFSETS:
                    for dx in OFFSETS:
                        obj = {"shape": shape, "size": size, "rotation": angle,
                               "x": (SIZE // 2 + 0.5 + dx) / SIZE, "y": (SIZE // 2 + 0.5 + dy) / SIZE}
                        alpha = object_alpha(obj, SIZE, supersample=8)
                        shifted.append(alpha[lo:lo + WINDOW, lo:lo + WINDOW])
                templates.append(np.stack(shifted))
                labels.append((shape, size, angle))
    return torch.from_numpy(np.stack(templates)), labels


def _crop(mask: torch.Tensor, cx: float, cy: float, shift: tuple[int, int]) -> torch.Tensor:
    """The WINDOW x WINDOW crop of a (H, W) mask whose centre pixel holds (cx, cy), moved by shift."""
    half = WINDOW // 2
    padded = F.pad(mask, (WINDOW, WINDOW, WINDOW, WINDOW))
    x0 = int(math.floor(cx)) - half + shift[0] + WINDOW
    y0 = int(math.floor(cy)) - half + shift[1] + WINDOW
    return padded[y0:y0 + WINDOW, x0:x0 + WINDOW]


def read_object(mask: torch.Tensor, n_angles: int = 24) -> dict:
    """The best-matching world object for one colour mask (H, W) at 32 px:
    {"shape", "size", "rotation", "iou", "x", "y"}; shape "none" when nothing matches."""
    total = float(mask.sum())
    if total < MIN_PIXELS:
        return {"shape": "none", "size": "none", "rotation": float("nan"), "iou": 0.0,
                "x": float("nan"), "y": float("nan")}
    h, w = mask.shape
    cx = float((mask.sum(0) * torch.arange(w)).sum()) / total + 0.5  # continuous pixel coordinates
    cy = float((mask.sum(1) * torch.arange(h)).sum()) / total + 0.5
    bank, labels = template_bank(n_angles)
    # the sub-pixel template nearest the centroid
    fx, fy = cx - math.floor(cx) - 0.5, cy - math.floor(cy) - 0.5
    ix = min(range(len(OFFSETS)), key=lambda k: abs(OFFSETS[k] - fx))
    iy = min(range(len(OFFSETS)), key=lambda k: abs(OFFSETS[k] - fy))
    templates = bank[:, iy * len(OFFSETS) + ix].flatten(1)  # (T, WINDOW^2)
    shifts = [(sx, sy) for sy in (-1, 0, 1) for sx in (-1, 0, 1)]
    crops = torch.stack([_crop(mask, cx, cy, s).flatten() for s in shifts])  # (S, WINDOW^2)
    inter = torch.minimum(crops[:, None], templates[None]).sum(-1)
    union = torch.maximum(crops[:, None], templates[None]).sum(-1)
    iou = inter / union.clamp_min(1e-6)  # (S, T)
    best = int(iou.max(0).values.argmax())
    s_best = int(iou[:, best].argmax())
    shape, size, angle = labels[best]
    score = float(iou[s_best, best])
    if score < MIN_IOU:
        shape = "none"
    return {"shape": shape, "size": size, "rotation": angle, "iou": score,
            "x": (cx + shifts[s_best][0]) / w, "y": (cy + shifts[s_best][1]) / h}


def _half(mask: torch.Tensor, relation: str | None, slot: int) -> torch.Tensor:
    """Keep the half of the image where object `slot` of a two-object scene lies (objects[0] is
    left of / above objects[1])."""
    if relation is None:
        return mask
    out = mask.clone()
    mid = mask.shape[-1] // 2
    if relation == "left of":
        (out[:, mid:] if slot == 0 else out[:, :mid]).zero_()
    else:
        (out[mid:] if slot == 0 else out[:mid]).zero_()
    return out


def to_reader_images(images: torch.Tensor) -> torch.Tensor:
    """Images as float (N, 3, 32, 32) in [-1, 1]: uint8 is rescaled, larger images area-resized."""
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=x.shape[-1] > SIZE,
                          align_corners=False).clamp(-1, 1)
    return x


def read_shapes(images: torch.Tensor, attributes: list[dict], n_angles: int = 24) -> list[list[dict]]:
    """The strict reading of every object that each attribute dict names with a colour.

    `attributes` are scenes' attributes or parsed captions (`shapes.parse_caption`); the object's
    named colour chooses the mask. Returns, per image, one `read_object` dict per named object
    (None where the object names no colour, since then there is no mask to read)."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    x = to_reader_images(images)
    out = []
    for image, attrs in zip(x, attributes):
        objs = attrs.get("objects", [])
        relation = attrs.get("relation") if len(objs) == 2 else None
        reads = []
        for slot, obj in enumerate(objs[:2]):
            if "colour" not in obj:
                reads.append(None)
                continue
            reads.append(read_object(_half(object_mask(image, obj["colour"]), relation, slot), n_angles))
        out.append(reads)
    return out


def strict_hits(images: torch.Tensor, attributes: list[dict], n_angles: int = 24) -> dict[str, torch.Tensor]:
    """Per image: "shape" (N,) bool, every named shape read right by `read_shapes`; "size" the
    same for sizes; "shape_named" / "size_named" (N,) bool where the entry names one on an object
    it also gives a colour (without a colour there is no mask, and the object is not scored)."""
    reads = read_shapes(images, attributes, n_angles)
    out = {k: torch.zeros(len(reads), dtype=torch.bool) for k in ("shape", "size", "shape_named", "size_named")}
    for i, (attrs, read) in enumerate(zip(attributes, reads)):
        for key in ("shape", "size"):
            pairs = [(obj[key], r[key]) for obj, r in zip(attrs.get("objects", []), read) if key in obj and r is not None]
            out[key + "_named"][i] = bool(pairs)
            out[key][i] = bool(pairs) and all(want == got for want, got in pairs)
    return out


def strict_accuracy(images: torch.Tensor, attributes: list[dict], n_angles: int = 24) -> dict[str, float]:
    """Shape and size accuracy by the strict reading, over the entries that name them."""
    hits = strict_hits(images, attributes, n_angles)
    return {k: float(hits[k][hits[k + "_named"]].float().mean()) if bool(hits[k + "_named"].any()) else float("nan")
            for k in ("shape", "size")}


# ---------------------------------------------------------------------------------------------
# Rotation and position of samples (how much a group of samples varies), by the same analysis by
# synthesis with a simpler colour mask: notebooks 10 and 12 measure spreads with it


def gaussian_colour_mask(image: torch.Tensor, colour: str, sigma: float = 40.0, floor: float = 0.1) -> torch.Tensor:
    """Soft mask (H, W) of the pixels of `colour` in one image (3, H, W) in [-1, 1]: a Gaussian of
    the RGB distance to the palette colour (sigma in 0-255 units), with values under `floor` cut
    to zero (a large light background would otherwise add up to a pull on the centroid). The
    backgrounds are grey, so a saturated object stands out from every one of them."""
    rgb = (image.float() + 1) * 127.5
    target = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None]
    m = torch.exp(-(rgb - target).pow(2).sum(0) / (2 * sigma ** 2))
    return ((m - floor) / (1 - floor)).clamp_min(0)


def estimate_rotation(images: torch.Tensor, predicted: list[dict], n_angles: int = 30) -> torch.Tensor:
    """The rotation (radians) of a one-object image, by analysis by synthesis at 32 px.

    The object is found by its colour (`gaussian_colour_mask`, with the judge's reading of the colour);
    its centre is the mask's centroid. Then the judge's reading of shape and size is drawn at that
    centre at `n_angles` rotations over the shape's symmetry period (`shapes.object_alpha`), and
    the rotation whose coverage is closest to the mask wins. NaN where rotation is undefined
    (circle, ring), where the judge reads two objects, or where no pixel has the colour.
    """
    x = to_model_images(images)
    size = x.shape[-1]
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = torch.full((len(x),), float("nan"))
    for i, p in enumerate(predicted):
        order = SYMMETRY[p["shape"]]
        if not order or p["count"] != 1:
            continue
        mask = gaussian_colour_mask(x[i], p["colour"])
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
