"""ShapesWorld: procedural scenes with captions and ground-truth attributes.

Every scene is a pure function of (world seed, split, index): random access, byte-identical
repeats, nothing materialised. A scene has a background "style" (two plain, two textured) and one
or two objects, each with a shape, colour and size (the attributes captions name) plus a
continuous position and rotation (the details captions mostly leave out, and that CLIP should
drop). Two-object scenes carry a spatial relation ("a red circle left of a blue square").

Object order in the attributes is canonical: ``objects[0]`` is the left (or upper) object, so a
caption and its paraphrase "a blue square right of a red circle" describe the same attributes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .config import WorldConfig

# Bump when rendering, captions or attribute sampling change: it keys every render cache.
WORLD_VERSION = 4

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 175, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 80, 230),
    "purple": (140, 60, 200),
    "pink": (245, 125, 190),
}
SIZES = {"small": 0.14, "medium": 0.185, "large": 0.23}  # radius as a fraction of the image side
RING_HOLE = 0.5  # the ring's hole radius, as a fraction of its outer radius
BACKGROUNDS = ("black", "white", "striped", "dotted")
RELATIONS = ("left of", "above")  # canonical: objects[0] is left of / above objects[1]
SPLITS = {"train": 0, "val": 1, "test": 2, "heldout": 3}
# Rotational symmetry order of each shape: rotation is only defined modulo 2*pi/order.
SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "ring": 0, "cross": 4}

# ---------------------------------------------------------------------------------------------
# Caption vocabulary (the grammar's paraphrases) and its inverse, used by parse_caption.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
BACKGROUND_WORDS = {"black": ("black", "dark"), "white": ("white", "light"),
                    "striped": ("striped",), "dotted": ("dotted", "polka-dot")}
BACKGROUND_NOUNS = {"black": "a black background", "white": "a white background",
                    "striped": "stripes", "dotted": "dots"}
RELATION_WORDS = {"left of": ("left of", "right of"), "above": ("above", "below")}  # (forward, reversed)

_WORD_TO_ATTR: dict[str, tuple[str, str]] = {}
for _s in SHAPES:
    _WORD_TO_ATTR[_s] = ("shape", _s)
for _c in COLOURS:
    _WORD_TO_ATTR[_c] = ("colour", _c)
for _k, _ws in SIZE_WORDS.items():
    for _w in _ws:
        _WORD_TO_ATTR[_w] = ("size", _k)
for _k, _ws in BACKGROUND_WORDS.items():
    for _w in _ws:
        _WORD_TO_ATTR[_w] = ("background", _k)
_WORD_TO_ATTR["stripes"] = ("background", "striped")
_WORD_TO_ATTR["dots"] = ("background", "dotted")


# ---------------------------------------------------------------------------------------------
# Geometry


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices of `shape` with circumradius 1, pointing up; None for the circle and the ring."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.3
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}; known shapes are {SHAPES}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


@lru_cache(maxsize=None)
def _background(kind: str, size: int, ss: int) -> np.ndarray:
    """The background image, float32 (H, W, 3) in [0, 255]; fixed per (kind, size)."""
    big = size * ss
    if kind == "black":
        return np.full((size, size, 3), 22.0, np.float32)
    if kind == "white":
        return np.full((size, size, 3), 232.0, np.float32)
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    period = size / 8 * ss  # 8 stripes / dot rows across the image
    if kind == "striped":
        for k in range(-16, 17):
            x0 = k * period
            draw.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 + big, big), (x0 + big, big)], fill=255)
        lo, hi = 55.0, 150.0
    elif kind == "dotted":
        r = period * 0.2
        for i in range(8):
            for j in range(8):
                cx, cy = (i + 0.5) * period, (j + 0.5) * period
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        lo, hi = 40.0, 175.0
    else:
        raise ValueError(f"unknown background {kind!r}; known backgrounds are {BACKGROUNDS}")
    m = np.asarray(img.reduce(ss), np.float32)[..., None] / 255.0
    return np.repeat(lo + (hi - lo) * m, 3, axis=2).astype(np.float32)


def _alpha_box(obj: dict, size: int, ss: int) -> tuple[np.ndarray, int, int]:
    """One object's antialiased coverage over its bounding box: (alpha (h, w) float32, x0, y0)."""
    r = SIZES[obj["size"]] * size
    cx, cy = obj["x"] * size, obj["y"] * size
    x0, y0 = max(int(math.floor(cx - r - 1)), 0), max(int(math.floor(cy - r - 1)), 0)
    x1, y1 = min(int(math.ceil(cx + r + 1)), size), min(int(math.ceil(cy + r + 1)), size)
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(mask)
    px, py = (cx - x0) * ss, (cy - y0) * ss
    poly = _POLYGONS[obj["shape"]]
    if poly is None:
        draw.ellipse([px - r * ss, py - r * ss, px + r * ss, py + r * ss], fill=255)
        if obj["shape"] == "ring":  # hole of half the radius
            h = RING_HOLE * r * ss
            draw.ellipse([px - h, py - h, px + h, py + h], fill=0)
    else:
        c, s = math.cos(obj["rotation"]), math.sin(obj["rotation"])
        draw.polygon([(px + r * ss * (c * u - s * v), py + r * ss * (s * u + c * v)) for u, v in poly], fill=255)
    return np.asarray(mask.reduce(ss), np.float32) / 255.0, x0, y0


def object_alpha(obj: dict, size: int, supersample: int = 4) -> np.ndarray:
    """An object's coverage (size, size) in [0, 1]: where `render` would paint it."""
    alpha, x0, y0 = _alpha_box(obj, size, supersample)
    out = np.zeros((size, size), np.float32)
    out[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
    return out


def _draw_object(canvas: np.ndarray, obj: dict, size: int, ss: int) -> None:
    """Alpha-composite one antialiased object onto canvas (H, W, 3) float32, in place."""
    alpha, x0, y0 = _alpha_box(obj, size, ss)
    colour = np.asarray(COLOURS[obj["colour"]], np.float32)
    region = canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
    region += alpha[..., None] * (colour - region)


def render(attributes: dict, image_size: int = 64, supersample: int = 4) -> np.ndarray:
    """Render a scene from its attribute dict: uint8 (H, W, 3)."""
    canvas = _background(attributes["background"], image_size, supersample).copy()
    for obj in attributes["objects"]:
        _draw_object(canvas, obj, image_size, supersample)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions


def _object_phrase(obj: dict, rng: np.random.Generator, article: bool = True) -> str:
    size = SIZE_WORDS[obj["size"]][rng.integers(len(SIZE_WORDS[obj["size"]]))]
    words = f"{size} {obj['colour']} {obj['shape']}"
    return f"a {words}" if article else words


def _position_phrase(obj: dict) -> str:
    dx, dy = obj["x"] - 0.5, obj["y"] - 0.5
    if abs(dx) > abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "near the top" if dy < 0 else "near the bottom"


def make_caption(attributes: dict, rng: np.random.Generator, cfg: WorldConfig) -> str:
    """One caption for a scene, drawn from the grammar's paraphrases with `rng`."""
    bg = attributes["background"]
    objs = attributes["objects"]
    with_bg = rng.random() < cfg.p_background_in_caption
    bg_adj = BACKGROUND_WORDS[bg][rng.integers(len(BACKGROUND_WORDS[bg]))]
    if len(objs) == 1:
        obj = objs[0]
        if with_bg:
            template = rng.integers(4)
            if template == 0:
                text = f"{_object_phrase(obj, rng)} on a {bg_adj} background"
            elif template == 1:
                text = f"{_object_phrase(obj, rng, article=False)}, {bg_adj} background"
            elif template == 2:
                text = f"{_object_phrase(obj, rng)} on {BACKGROUND_NOUNS[bg]}"
            else:
                text = f"there is {_object_phrase(obj, rng)} on a {bg_adj} background"
        else:
            template = rng.integers(3)
            if template == 0:
                text = _object_phrase(obj, rng)
            elif template == 1:
                text = _object_phrase(obj, rng, article=False)
            else:
                text = f"a picture of {_object_phrase(obj, rng)}"
        if rng.random() < cfg.p_position_in_caption:
            text = f"{text} {_position_phrase(obj)}"
        return text
    forward, backward = RELATION_WORDS[attributes["relation"]]
    a, b = _object_phrase(objs[0], rng), _object_phrase(objs[1], rng)
    text = f"{a} {forward} {b}" if rng.random() < 0.5 else f"{b} {backward} {a}"
    if with_bg:
        text = f"{text}, {bg_adj} background" if rng.random() < 0.5 else f"{text} on {BACKGROUND_NOUNS[bg]}"
    return text


def parse_caption(caption: str) -> dict:
    """The attributes a caption names, in the same canonical form as a scene's attributes.

    Returns ``{"count", "objects": [{"shape"?, "colour"?, "size"?}, ...], "background"?,
    "relation"?}``; attributes the caption leaves out are absent. Words outside the grammar are
    ignored, so free-form text parses to whatever ShapesWorld words it contains.
    """
    text = " ".join(caption.lower().replace(",", " ").split())
    relation, reverse, clauses = None, False, [text]
    for rel, (fwd, bwd) in RELATION_WORDS.items():
        for word, rev in ((fwd, False), (bwd, True)):
            if f" {word} " in f" {text} ":
                left, right = f" {text} ".split(f" {word} ", 1)
                relation, reverse, clauses = rel, rev, [left.strip(), right.strip()]
                break
        if relation:
            break
    out: dict = {"count": len(clauses), "objects": []}
    for clause in clauses:
        obj = {}
        for word in clause.split():
            attr = _WORD_TO_ATTR.get(word)
            if attr is None:
                continue
            if attr[0] == "background":
                out["background"] = attr[1]
            else:
                obj.setdefault(attr[0], attr[1])
        out["objects"].append(obj)
    if relation:
        out["relation"] = relation
        if reverse:
            out["objects"].reverse()
    return out


_FILLER_WORDS = {"a", "an", "the", "on", "background"}


def parse_composition(text: str) -> dict:
    """A held-out composition such as "green star" as {"colour": "green", "shape": "star"}."""
    comp = {}
    for word in text.lower().split():
        if word in _FILLER_WORDS:
            continue
        attr = _WORD_TO_ATTR.get(word)
        if attr is None:
            raise ValueError(f"held-out composition {text!r}: unknown word {word!r}; use words from "
                             f"shapes {SHAPES}, colours {tuple(COLOURS)}, sizes {tuple(SIZE_WORDS)} "
                             f"or backgrounds {BACKGROUNDS}")
        comp[attr[0]] = attr[1]
    if not comp:
        raise ValueError(f"held-out composition {text!r} names no attribute")
    return comp


def matches(obj: dict, background: str, composition: dict) -> bool:
    """Does an object (in a scene with `background`) have every attribute of `composition`?"""
    return all((background if k == "background" else obj.get(k)) == v for k, v in composition.items())


# ---------------------------------------------------------------------------------------------
# The world


@dataclass
class Sample:
    """One scene: the image, one caption, and its ground-truth attributes."""

    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    attributes: dict


class ShapesWorld:
    """A split of ShapesWorld, indexed like a sequence: ``world[i]`` is a `Sample`.

    ``train`` never contains a held-out composition (for example every green star); every
    ``heldout`` scene contains one, as ``objects[attributes["held_out_object"]]`` (in two-object
    scenes it may sit on either side). ``val`` and ``test`` share train's distribution with other
    images.
    """

    def __init__(self, split: str = "train", cfg: WorldConfig | None = None, length: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
        self.cfg = cfg or WorldConfig()
        self.split = split
        self.held_out = [parse_composition(t) for t in self.cfg.held_out]
        if split == "heldout" and not self.held_out:
            raise ValueError("the heldout split needs at least one composition in WorldConfig.held_out")
        self.length = length if length is not None else getattr(self.cfg, f"n_{split}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for the {self.split} split of length {self.length}")
        attributes = self.attributes(index)
        rng = np.random.default_rng([self.cfg.seed, SPLITS[self.split], index, 1])
        image = render(attributes, self.cfg.image_size, self.cfg.supersample)
        return Sample(image, make_caption(attributes, rng, self.cfg), attributes)

    def _is_held_out(self, obj: dict, background: str) -> bool:
        return any(matches(obj, background, c) for c in self.held_out)

    def _draw_object(self, rng: np.random.Generator, background: str, fixed: dict | None = None) -> dict:
        """Draw an object's discrete attributes. With `fixed` (a held-out composition) those
        attributes are kept; otherwise the object is redrawn until it matches no composition."""
        for _ in range(1000):
            cand = {k: v for k, v in (fixed or {}).items() if k != "background"}
            cand.setdefault("shape", SHAPES[rng.integers(len(SHAPES))])
            cand.setdefault("colour", tuple(COLOURS)[rng.integers(len(COLOURS))])
            cand.setdefault("size", tuple(SIZES)[rng.integers(len(SIZES))])
            if fixed is not None or not self._is_held_out(cand, background):
                return cand
        raise ValueError(f"the held-out compositions {self.cfg.held_out} exclude every object")

    def attributes(self, index: int) -> dict:
        """The ground-truth attributes of scene `index` (cheap: nothing is rendered)."""
        rng = np.random.default_rng([self.cfg.seed, SPLITS[self.split], index, 0])
        two = rng.random() < self.cfg.p_two_objects
        comp = self.held_out[rng.integers(len(self.held_out))] if self.split == "heldout" else None
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if comp is not None and "background" in comp:
            background = comp["background"]
        objs = [self._draw_object(rng, background, comp)]
        if two:
            objs.append(self._draw_object(rng, background))
        relation = RELATIONS[rng.integers(2)] if two else None
        held_at = 0
        if two and rng.random() < 0.5:
            objs.reverse()  # the held-out object may sit on either side
            held_at = 1
        for k, obj in enumerate(objs):
            r = SIZES[obj["size"]]
            lo, hi = r + 1.5 / self.cfg.image_size, 1 - r - 1.5 / self.cfg.image_size
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if two:  # object 0 in the left (upper) half, object 1 in the right (lower) half
                a_lo, a_hi = (lo, 0.5 - r - 0.5 / self.cfg.image_size) if k == 0 else (0.5 + r + 0.5 / self.cfg.image_size, hi)
                along = rng.uniform(a_lo, max(a_lo, a_hi))
                x, y = (along, y) if relation == "left of" else (x, along)
            sym = SYMMETRY[obj["shape"]]
            obj["x"], obj["y"] = float(x), float(y)
            obj["rotation"] = float(rng.uniform(0, 2 * math.pi / sym)) if sym else 0.0
        out = {"count": len(objs), "background": background, "objects": objs,
               "shape": objs[0]["shape"], "colour": objs[0]["colour"], "size": objs[0]["size"]}
        if two:
            out["relation"] = relation
        if comp is not None:
            out["held_out_object"] = held_at
        return out


def caption_matches(caption_attrs: dict, scene_attrs: dict) -> bool:
    """Does a scene have every attribute a caption names (in canonical object order)?"""
    if caption_attrs.get("count", 1) != scene_attrs["count"]:
        return False
    if "background" in caption_attrs and caption_attrs["background"] != scene_attrs["background"]:
        return False
    if "relation" in caption_attrs and caption_attrs["relation"] != scene_attrs.get("relation"):
        return False
    for want, have in zip(caption_attrs["objects"], scene_attrs["objects"]):
        if any(have[k] != v for k, v in want.items()):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Partial captions and vectorised matching (used by CLIP's training and its zero-shot prompts)

PROMPT_ATTRIBUTES = ("shape", "colour", "size", "background")


def partial_caption(attributes: dict, named: tuple[str, ...] | list[str], rng: np.random.Generator | None = None) -> str:
    """A caption of a one-object scene naming only the attributes in `named`.

    ``named=("colour",)`` gives "a red shape"; ``("shape", "background")`` gives "a star on a
    striped background". The generic noun "shape" stands in for an unnamed shape. Synonyms are
    drawn with `rng` (the first synonym without one). These captions teach CLIP that a caption
    may leave attributes out, and they are the zero-shot prompts.
    """
    unknown = sorted(set(named) - set(PROMPT_ATTRIBUTES))
    if unknown or not named:
        raise ValueError(f"named must be a non-empty subset of {PROMPT_ATTRIBUTES}, got {tuple(named)}")
    pick = (lambda words: words[rng.integers(len(words))]) if rng is not None else (lambda words: words[0])
    obj = attributes["objects"][0] if "objects" in attributes else attributes
    words = []
    if "size" in named:
        words.append(pick(SIZE_WORDS[obj["size"]]))
    if "colour" in named:
        words.append(obj["colour"])
    words.append(obj["shape"] if "shape" in named else "shape")
    text = "a " + " ".join(words)
    if "background" in named:
        text += f" on a {pick(BACKGROUND_WORDS[attributes['background']])} background"
    return text


MATCH_FIELDS = ("count", "background", "relation", "shape", "colour", "size", "shape2", "colour2", "size2")
_VOCAB = {"background": BACKGROUNDS, "relation": RELATIONS, "shape": SHAPES, "colour": tuple(COLOURS),
          "size": tuple(SIZES)}
ANY, ABSENT = -1, -2  # codes: a caption that leaves a field out / a scene without a second object


def scene_codes(attributes: list[dict]) -> np.ndarray:
    """Scenes' attributes as an int array (N, len(MATCH_FIELDS)), for `match_matrix`."""
    out = np.full((len(attributes), len(MATCH_FIELDS)), ABSENT, dtype=np.int64)
    for i, a in enumerate(attributes):
        out[i, 0] = a["count"]
        out[i, 1] = BACKGROUNDS.index(a["background"])
        if "relation" in a:
            out[i, 2] = RELATIONS.index(a["relation"])
        for k, obj in enumerate(a["objects"][:2]):
            for j, attr in enumerate(("shape", "colour", "size")):
                out[i, 3 + 3 * k + j] = _VOCAB[attr].index(obj[attr])
    return out


def caption_codes(captions: list[str]) -> np.ndarray:
    """What captions name, as an int array (N, len(MATCH_FIELDS)); ANY where a caption is silent."""
    out = np.full((len(captions), len(MATCH_FIELDS)), ANY, dtype=np.int64)
    for i, caption in enumerate(captions):
        c = parse_caption(caption)
        out[i, 0] = c["count"]
        if "background" in c:
            out[i, 1] = BACKGROUNDS.index(c["background"])
        if "relation" in c:
            out[i, 2] = RELATIONS.index(c["relation"])
        for k, obj in enumerate(c["objects"][:2]):
            for j, attr in enumerate(("shape", "colour", "size")):
                if attr in obj:
                    out[i, 3 + 3 * k + j] = _VOCAB[attr].index(obj[attr])
    return out


def match_matrix(captions: np.ndarray, scenes: np.ndarray) -> np.ndarray:
    """(A, B) bool: does scene b have every attribute caption a names? Vectorised
    `caption_matches`; takes `caption_codes` and `scene_codes` arrays (numpy or torch)."""
    c, s = captions[:, None, :], scenes[None, :, :]
    return ((c == ANY) | (c == s)).all(-1)
