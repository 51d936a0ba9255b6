"""Icons: a caption folder the project draws itself, so that notebook 13 has data that is not ShapesWorld.

    make_icon_folder("build/icons", n=3000)   # 64 px PNGs + captions.jsonl, in a few seconds

Each image is one flat icon (a heart, an arrow pointing one of four ways, a smiling or frowning
face, a house, a crescent moon, a flower) in one of seven inks on one of three grounds, drawn at
4x and downsampled (antialiased), with a little jitter in size and place. The captions follow
their own phrasing ("an icon of a teal house on a pale yellow card", "a crimson arrow pointing
left, drawn on white paper"), not ShapesWorld's grammar, so nothing downstream can lean on the
ShapesWorld parser or judge. The folder is an ordinary caption folder (`data.CaptionFolder`); a
folder of your own photos or drawings trains the same way.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import checkpoint as ckpt

INKS = {"crimson": (200, 20, 50), "navy": (20, 40, 130), "forest green": (30, 110, 45), "gold": (230, 180, 20),
        "violet": (140, 70, 200), "teal": (0, 140, 140), "black": (20, 20, 20)}
GROUNDS = {"white paper": (250, 250, 250), "a pale yellow card": (250, 240, 190), "a sky blue tile": (170, 210, 245)}
ICONS = ("heart", "arrow pointing up", "arrow pointing down", "arrow pointing left", "arrow pointing right",
         "smiling face", "frowning face", "house", "crescent moon", "flower")
TEMPLATES = ("a {ink} {icon} on {ground}", "an icon of a {ink} {icon} on {ground}",
             "a {ink} {icon}, drawn on {ground}", "{ground_cap} with a {ink} {icon}")
SUPERSAMPLE = 4


def _polygon(draw, points, fill):
    draw.polygon([tuple(map(float, p)) for p in points], fill=fill)


def _draw_icon(draw: ImageDraw.ImageDraw, icon: str, cx: float, cy: float, r: float, ink, ground) -> None:
    """One icon of radius about r centred at (cx, cy), in `ink` (details cut out in `ground`)."""
    def disc(x, y, rad, fill):
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if icon == "heart":
        disc(cx - 0.45 * r, cy - 0.3 * r, 0.52 * r, ink)
        disc(cx + 0.45 * r, cy - 0.3 * r, 0.52 * r, ink)
        _polygon(draw, [(cx - 0.95 * r, cy - 0.15 * r), (cx + 0.95 * r, cy - 0.15 * r), (cx, cy + 0.95 * r)], ink)
    elif icon.startswith("arrow"):
        angle = {"up": -90, "down": 90, "left": 180, "right": 0}[icon.rsplit(" ", 1)[1]]
        shape = [(-0.9, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.22), (-0.9, 0.22)]
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        _polygon(draw, [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in shape], ink)
    elif icon.endswith("face"):
        disc(cx, cy, r, ink)
        disc(cx - 0.35 * r, cy - 0.3 * r, 0.14 * r, ground)
        disc(cx + 0.35 * r, cy - 0.3 * r, 0.14 * r, ground)
        w = max(1.0, 0.12 * r)
        if icon == "smiling face":
            draw.arc([cx - 0.55 * r, cy - 0.35 * r, cx + 0.55 * r, cy + 0.6 * r], 20, 160, fill=ground, width=int(w))
        else:
            draw.arc([cx - 0.55 * r, cy + 0.2 * r, cx + 0.55 * r, cy + 1.0 * r], 200, 340, fill=ground, width=int(w))
    elif icon == "house":
        draw.rectangle([cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + 0.9 * r], fill=ink)
        _polygon(draw, [(cx - 0.95 * r, cy - 0.05 * r), (cx, cy - 0.95 * r), (cx + 0.95 * r, cy - 0.05 * r)], ink)
        draw.rectangle([cx - 0.18 * r, cy + 0.35 * r, cx + 0.18 * r, cy + 0.9 * r], fill=ground)
    elif icon == "crescent moon":
        disc(cx, cy, r, ink)
        disc(cx + 0.45 * r, cy - 0.2 * r, 0.85 * r, ground)
    elif icon == "flower":
        for k in range(6):
            a = math.radians(60 * k)
            disc(cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a), 0.4 * r, ink)
        disc(cx, cy, 0.3 * r, ground)
    else:
        raise ValueError(f"unknown icon {icon!r}; choose one of {ICONS}")


def draw_icon(icon: str, ink: str, ground: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One icon image, uint8 (size, size, 3): `ink` in INKS, `ground` in GROUNDS."""
    big = size * SUPERSAMPLE
    fill, back = INKS[ink], GROUNDS[ground]
    im = Image.new("RGB", (big, big), back)
    r = big * rng.uniform(0.26, 0.34)
    cx, cy = big / 2 + rng.uniform(-0.12, 0.12) * big, big / 2 + rng.uniform(-0.12, 0.12) * big
    _draw_icon(ImageDraw.Draw(im), icon, cx, cy, r, fill, back)
    return np.asarray(im.reduce(SUPERSAMPLE), dtype=np.uint8)


def icon_caption(icon: str, ink: str, ground: str, rng: np.random.Generator) -> str:
    """One of the caption templates, filled in (no ink starts with a vowel, so "a" always reads right)."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(ink=ink, icon=icon, ground=ground, ground_cap=ground[0].upper() + ground[1:])


def make_icon_folder(root: str | Path, n: int = 3000, seed: int = 0, size: int = 64) -> Path:
    """Draw `n` icons into `root` (PNG files + captions.jsonl, with their attributes) and return it.
    Deterministic for (n, seed, size); a folder already made with the same settings is kept as is."""
    root = Path(root)
    settings = {"n": n, "seed": seed, "size": size, "version": 1}
    stamp = root / "made_by.json"
    if stamp.exists() and ckpt.read_json(stamp) == settings and (root / "captions.jsonl").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        icon, ink = ICONS[int(rng.integers(len(ICONS)))], list(INKS)[int(rng.integers(len(INKS)))]
        ground = list(GROUNDS)[int(rng.integers(len(GROUNDS)))]
        name = f"icon_{i:05d}.png"
        Image.fromarray(draw_icon(icon, ink, ground, rng, size)).save(root / name, optimize=False)
        lines.append(json.dumps({"file": name, "caption": icon_caption(icon, ink, ground, rng),
                                 "attributes": {"icon": icon, "ink": ink, "ground": ground}}))
    ckpt.write_text(root / "captions.jsonl", "\n".join(lines) + "\n")
    ckpt.write_json(stamp, settings)
    return root
