"""Self-describing artifacts: a stage's folder holds ``model.safetensors``, ``config.json`` and
``metrics.json``. Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so an interruption leaves either the old file or the new one, never half of one.
Weights are safetensors only: no pickle anywhere.

Resumable training state (weights, EMA, optimiser, step, RNG) goes into one safetensors file whose
header metadata carries the non-tensor part as JSON, so it too is replaced in one atomic step.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import config as config_lib

FORMAT_VERSION = 1
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or was made with a different config."""


class ConfigMismatchError(ArtifactError):
    """A stored config differs from the expected one; `.differences` lists the fields as
    'path: stored != expected'."""

    def __init__(self, path: Path, differences: list[str], advice: str = ""):
        self.path, self.differences = path, differences
        lines = "\n  ".join(differences)
        advice = advice or "Use another artifacts folder, or retrain this stage (retrain=True)."
        super().__init__(f"{path} was made with a different config (stored != expected):\n  {lines}\n{advice}")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    _atomic_write(Path(path), write)


def read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (shared storage is copied apart)."""
    clean, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.numel() and v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        clean[k] = v
    _atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from e


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------
# Stage artifacts


def save_stage(folder: str | Path, stage: str, state_dict: dict[str, torch.Tensor], config,
               metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a stage's artifact: weights, config (with the stage name) and metrics.

    `config` is a dataclass config or a dict; `extra` holds more JSON-able facts for config.json
    (for example the CLIP model a stage was trained against).
    """
    folder = Path(folder)
    cfg = config_lib.to_dict(config) if not isinstance(config, dict) else config
    save_tensors(folder / WEIGHTS, state_dict)
    write_json(folder / CONFIG, {"stage": stage, "format_version": FORMAT_VERSION, "config": cfg,
                                 **(extra or {})})
    write_json(folder / METRICS, {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  **(metrics or {})})
    return folder


def archive_stage(folder: str | Path) -> Path:
    """Move a stage folder aside (to `<name>.stale-<UTC time>`) so nothing saved is lost."""
    folder = Path(folder)
    target = folder.with_name(f"{folder.name}.stale-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    folder.rename(target)
    return target


def stage_exists(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / name).exists() for name in (WEIGHTS, CONFIG, METRICS))


def load_stage(folder: str | Path, stage: str, expected_config=None, device: str = "cpu"):
    """Load a stage artifact: (state_dict, config dict, metrics dict).

    If `expected_config` is given, the stored config must equal it; otherwise a
    ConfigMismatchError names every differing field.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"no {stage} artifact at {folder} (the folder does not exist)")
    meta = read_json(folder / CONFIG)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}/{CONFIG} has format version {meta.get('format_version')!r}; this "
                            f"unclip_lite reads version {FORMAT_VERSION}. Retrain the stage.")
    if meta.get("stage") != stage:
        raise ArtifactError(f"{folder}/{CONFIG} holds stage {meta.get('stage')!r}, expected {stage!r}")
    if expected_config is not None:
        want = config_lib.to_dict(expected_config) if not isinstance(expected_config, dict) else expected_config
        differences = config_lib.diff(meta["config"], want)
        if differences:
            raise ConfigMismatchError(folder / CONFIG, differences)
    state = load_tensors(folder / WEIGHTS, device=device)
    metrics = read_json(folder / METRICS)
    return state, meta, metrics


# ---------------------------------------------------------------------------------------------
# Nested state (optimiser, training state) <-> flat tensors + JSON, without pickle


def flatten_state(obj, prefix: str = "", tensors: dict | None = None):
    """Split a nested structure into (JSON-able skeleton, {key: tensor})."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        skel = {"__dict__": [[k if isinstance(k, str) else {"__int__": k},
                              flatten_state(v, f"{prefix}/{k}", tensors)[0]] for k, v in obj.items()]}
        return skel, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)]
        return ({"__tuple__": items} if isinstance(obj, tuple) else items), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix or '/'} without pickle")


def unflatten_state(skel, tensors: dict):
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {(k["__int__"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                    for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def save_state(path: str | Path, state: dict) -> None:
    """Save a nested training state as one safetensors file (skeleton JSON in its metadata)."""
    skel, tensors = flatten_state(state)
    save_tensors(path, tensors, metadata={"state": json.dumps(skel)})


def load_state(path: str | Path, device: str = "cpu") -> dict:
    tensors = load_tensors(path, device=device)
    meta = read_metadata(path)
    if "state" not in meta:
        raise ArtifactError(f"{path} holds no training state (no 'state' metadata)")
    return unflatten_state(json.loads(meta["state"]), tensors)


def fingerprint(folder: str | Path | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Identifies a model's weights: the sha1 of the weights file in `folder` when there is one,
    else of `state_dict`'s tensors (12 hex digits). Later stages record their CLIP's fingerprint."""
    h = hashlib.sha1()
    if folder is not None and (Path(folder) / WEIGHTS).exists():
        with open(Path(folder) / WEIGHTS, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif state_dict is not None:
        for k, v in sorted(state_dict.items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    else:
        raise ValueError("fingerprint needs a folder holding weights or a state_dict")
    return h.hexdigest()[:12]
