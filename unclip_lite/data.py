"""Datasets: ShapesWorld splits, a folder of your own images + captions, and tensor caches.

Both kinds of dataset index like a sequence and return `shapes.Sample(image, caption,
attributes)`: a uint8 (H, W, 3) image, a caption string, and an attribute dict (empty for your own
images unless ``captions.jsonl`` provides one).

Your own data: a folder with images and ``captions.jsonl``::

    {"file": "cat.png", "caption": "a cat on a sofa"}
    {"file": "dog.jpg", "caption": "a dog", "attributes": {"animal": "dog"}}

or ``captions.csv`` with the header ``file,caption``. Bad entries raise `DataError` naming the
file and line; with ``on_error="skip"`` they are skipped and listed in ``dataset.skipped``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import checkpoint as ckpt
from .runtime import main_process_first
from .shapes import WORLD_VERSION, Sample, ShapesWorld

REQUIRED_COLUMNS = ("file", "caption")
OPTIONAL_COLUMNS = ("attributes",)


class DataError(ValueError):
    """A dataset entry is unusable; the message names the file and line."""


def load_image(path: Path | io.BytesIO, image_size: int) -> np.ndarray:
    """Open an image, centre-crop it square and resize to image_size: uint8 (H, W, 3).

    The EXIF orientation is applied (phone photos come out upright), and transparent pixels
    are composited onto white (a transparent icon's background becomes white, not black)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != image_size:
        im = im.resize((image_size, image_size), Image.BICUBIC, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)


class CaptionFolder:
    """A folder of images plus ``captions.jsonl`` or ``captions.csv``, with ShapesWorld's interface.

    Every entry is checked when the dataset is built (the file exists, decodes as an image, the
    caption is non-empty), so errors surface at once rather than mid-training.
    """

    def __init__(self, root: str | Path, image_size: int = 64, on_error: str = "raise",
                 allow_symlinks: bool = False):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.allow_symlinks = allow_symlinks  # follow symlinks whose target lies inside the folder
        self.digests: dict[Path, str] = {}  # file -> sha1 of its bytes: the cache key is the content
        self.image_size = image_size
        self.on_error = on_error
        self.skipped: list[str] = []
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")
        jsonl, csv_path = self.root / "captions.jsonl", self.root / "captions.csv"
        if jsonl.exists():
            self.index_file = jsonl
            rows = self._read_jsonl(jsonl)
        elif csv_path.exists():
            self.index_file = csv_path
            rows = self._read_csv(csv_path)
        else:
            raise DataError(f"{self.root}: found neither captions.jsonl nor captions.csv")
        self.entries: list[tuple[Path, str, dict]] = []
        for line_no, row in rows:
            entry = self._check(line_no, row)
            if entry is not None:
                self.entries.append(entry)
        if not self.entries:
            raise DataError(f"{self.index_file}: no usable entries ({len(self.skipped)} skipped)")

    # -- parsing ------------------------------------------------------------------------------
    def _fail(self, line_no: int, message: str) -> None:
        text = f"{self.index_file}, line {line_no}: {message}"
        if self.on_error == "raise":
            raise DataError(text)
        self.skipped.append(text)

    def _read_jsonl(self, path: Path):
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._fail(line_no, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                self._fail(line_no, f"expected a JSON object with fields {REQUIRED_COLUMNS}, got {row!r}")
                continue
            rows.append((line_no, row))
        return rows

    def _read_csv(self, path: Path):
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a spreadsheet's BOM
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
            if missing or unknown:
                raise DataError(f"{path}, line 1: the header must be {','.join(REQUIRED_COLUMNS)}; "
                                f"missing column(s) {missing}, unknown column(s) {unknown}")
            return [(line_no, row) for line_no, row in enumerate(reader, start=2)]

    def _check(self, line_no: int, row: dict):
        if None in row:  # csv.DictReader puts surplus fields under the key None
            return self._fail(line_no, f"{len(row[None])} more field(s) than the header's columns: {row[None]}")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        unknown = [c for c in row if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
        if missing or unknown:
            return self._fail(line_no, f"missing field(s) {missing}, unknown field(s) {unknown}; "
                                       f"each entry needs {REQUIRED_COLUMNS}")
        caption = row["caption"]
        if not isinstance(caption, str) or not caption.strip():
            return self._fail(line_no, f"empty caption for {row['file']!r}")
        name = str(row["file"])
        path = self.root / name
        if Path(name).is_absolute():
            return self._fail(line_no, f"file {name!r} is an absolute path; entries name files inside {self.root}")
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            return self._fail(line_no, f"file {name!r} leads outside the folder {self.root} (to {path.resolve()})")
        linked = [p for p in [path, *path.parents] if p.is_relative_to(self.root) and p != self.root and p.is_symlink()]
        if linked and not self.allow_symlinks:
            return self._fail(line_no, f"file {name!r} goes through the symlink {linked[0]}; pass "
                                       "allow_symlinks=True to follow links that stay inside the folder")
        if not path.is_file():
            return self._fail(line_no, f"image file {path} does not exist")
        try:
            raw = path.read_bytes()  # read once: decoded to check it, hashed for the cache key
            load_image(io.BytesIO(raw), self.image_size)
            self.digests[path] = hashlib.sha1(raw).hexdigest()
        except Image.DecompressionBombError as e:
            return self._fail(line_no, f"image file {path} is too large to decode safely ({e})")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return self._fail(line_no, f"image file {path} cannot be read as an image ({e})")
        attributes = row.get("attributes") or {}
        if isinstance(attributes, str):
            try:
                attributes = json.loads(attributes) if attributes.strip() else {}
            except json.JSONDecodeError as e:
                return self._fail(line_no, f"the attributes of {row['file']!r} are not valid JSON ({e.msg})")
        if not isinstance(attributes, dict):
            return self._fail(line_no, f"the attributes of {row['file']!r} must be a JSON object, got {attributes!r}")
        return path, caption.strip(), attributes

    # -- sequence interface -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        path, caption, attributes = self.entries[index]
        return Sample(load_image(path, self.image_size), caption, attributes)


# ---------------------------------------------------------------------------------------------
# Tensors and caches


def dataset_key(dataset, n: int) -> str:
    """A short hash identifying (dataset, n) for cache file names."""
    if isinstance(dataset, ShapesWorld):
        from .config import to_dict
        ident = json.dumps({"world": to_dict(dataset.cfg), "version": WORLD_VERSION, "split": dataset.split,
                            "n": n}, sort_keys=True)
    else:  # file names, their bytes and captions: an edited (or swapped) file gets a new cache
        ident = json.dumps({"root": str(Path(dataset.root).resolve()), "n": n, "size": dataset.image_size,
                            "entries": [[str(p), getattr(dataset, "digests", {}).get(p), c] for p, c, _ in dataset.entries[:n]]})
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def rendered(dataset, n: int | None = None, cache_dir: str | Path | None = None) -> dict:
    """The first n samples as {"images": uint8 (N, 3, H, W) tensor, "captions", "attributes"}.

    With `cache_dir` the result is stored (safetensors + JSON) and reused by later calls (under
    torchrun rank 0 renders and stores it while the other ranks wait, then they read it).
    """
    with main_process_first():
        return _rendered(dataset, n, cache_dir)


def _rendered(dataset, n: int | None, cache_dir: str | Path | None) -> dict:
    n = len(dataset) if n is None else min(n, len(dataset))
    cache = None
    if cache_dir is not None:
        name = f"{getattr(dataset, 'split', 'folder')}-{dataset_key(dataset, n)}"
        cache = Path(cache_dir) / name
        if (cache / "images.safetensors").exists() and (cache / "samples.json").exists():
            images = ckpt.load_tensors(cache / "images.safetensors")["images"]
            meta = ckpt.read_json(cache / "samples.json")
            return {"images": images, "captions": meta["captions"], "attributes": meta["attributes"]}
    samples = [dataset[i] for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    out = {"images": images, "captions": [s.caption for s in samples],
           "attributes": [s.attributes for s in samples]}
    if cache is not None:
        ckpt.save_tensors(cache / "images.safetensors", {"images": images})
        ckpt.write_json(cache / "samples.json", {"captions": out["captions"], "attributes": out["attributes"]})
    return out


def single_object(data: dict, n: int | None = None) -> dict:
    """The one-object scenes of a rendered split (the manipulations are measured on them), first n."""
    keep = [i for i, a in enumerate(data["attributes"]) if a["count"] == 1][:n]
    return {"images": data["images"][keep], "captions": [data["captions"][i] for i in keep],
            "attributes": [data["attributes"][i] for i in keep], "index": keep}


# ---------------------------------------------------------------------------------------------
# The data source of a preset: ShapesWorld or a caption folder, chosen by `preset.data.source`

SHAPESWORLD = "shapesworld"
FOLDER_SPLITS = ("train", "val")


class NeedsShapesWorld(ValueError):
    """Asked for something only ShapesWorld has (the judge, held-out compositions, attributes)
    while the preset's data is a caption folder."""


def uses_folder(preset) -> bool:
    """Whether the preset trains on a caption folder rather than ShapesWorld."""
    return preset.data.source != SHAPESWORLD


def require_shapesworld(preset, what: str) -> None:
    """Refuse `what` (e.g. "the judge") when the preset's data is a caption folder, saying why."""
    if uses_folder(preset):
        raise NeedsShapesWorld(
            f"{what} needs ShapesWorld (it reads the world's ground-truth attributes), but this preset's data is "
            f"the caption folder {preset.data.source}; on a folder, measure with the judge-free measures "
            "(unclip_lite.studies.judge_free: CLIP score, retrieval, Fréchet distance on CLIP features)")


_FOLDERS: dict[tuple, CaptionFolder] = {}


def caption_folder(data_cfg, image_size: int) -> CaptionFolder:
    """The preset's caption folder, read and checked once per process (again if its index file changes)."""
    root = Path(data_cfg.source).expanduser()
    index = next((root / n for n in ("captions.jsonl", "captions.csv") if (root / n).exists()), None)
    stat = index.stat() if index is not None else None
    stamp = (stat.st_mtime_ns, stat.st_size) if stat is not None else None
    key = (str(root.resolve()), image_size, data_cfg.allow_symlinks, stamp)
    if key not in _FOLDERS:
        _FOLDERS[key] = CaptionFolder(root, image_size, allow_symlinks=data_cfg.allow_symlinks)
    return _FOLDERS[key]


def in_val(name: str, val_fraction: float, seed: int) -> bool:
    """The split rule for folders: an entry is in val when a seeded hash of its file name (its
    path inside the folder) falls below `val_fraction`. Adding files never moves old ones."""
    h = int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return h < val_fraction


class FolderSplit:
    """The train or val part of a `CaptionFolder` (split by `in_val`), with its interface."""

    def __init__(self, folder: CaptionFolder, split: str, val_fraction: float, seed: int):
        if split not in FOLDER_SPLITS:
            raise NeedsShapesWorld(f"the {split!r} split needs ShapesWorld; the caption folder {folder.root} "
                                   f"has the splits {FOLDER_SPLITS}")
        self.folder, self.split, self.root, self.image_size = folder, split, folder.root, folder.image_size
        want_val = split == "val"
        self.entries = [e for e in folder.entries
                        if in_val(e[0].relative_to(folder.root).as_posix(), val_fraction, seed) == want_val]
        self.digests = folder.digests
        if not self.entries:
            raise DataError(f"{folder.index_file}: the {split} split is empty ({len(folder)} entries, val_fraction "
                            f"{val_fraction}); add images or change data.val_fraction")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        path, caption, attributes = self.entries[index]
        return Sample(load_image(path, self.image_size), caption, attributes)


def dataset(preset, split: str):
    """The preset's data for `split`: ShapesWorld(split) or a split of its caption folder."""
    if not uses_folder(preset):
        return ShapesWorld(split, preset.world)
    return FolderSplit(caption_folder(preset.data, preset.world.image_size), split,
                       preset.data.val_fraction, preset.data.split_seed)


def eval_splits(preset) -> tuple[str, ...]:
    """The splits a stage measures itself on: val and held-out compositions, or a folder's val."""
    return ("val",) if uses_folder(preset) else ("val", "heldout")


def source_config(preset) -> dict:
    """What a stage artifact records of its data: ShapesWorld's world config, or the folder's path,
    split and a hash of its content (file names, image bytes, captions), so that an edited folder
    makes stored stages stale instead of silently mixing."""
    from .config import to_dict
    if not uses_folder(preset):
        return {"world": to_dict(preset.world)}
    folder = caption_folder(preset.data, preset.world.image_size)
    content = hashlib.sha1(json.dumps([[p.relative_to(folder.root).as_posix(), folder.digests.get(p), c]
                                       for p, c, _ in folder.entries]).encode()).hexdigest()[:16]
    return {"data": {**to_dict(preset.data), "source": str(folder.root.resolve()), "entries": len(folder),
                     "content": content, "image_size": preset.world.image_size}}
