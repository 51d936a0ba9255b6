"""Self-describing artifacts: a stage's folder holds ``model.safetensors``, ``config.json`` and
``metrics.json``. Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so an interruption leaves either the old file or the new one, never half of one.
Weights are safetensors only: no pickle anywhere.

Resumable training state (weights, EMA, optimiser, step, RNG) goes into one safetensors file whose
header metadata carries the non-tensor part as JSON, so it too is replaced in one atomic step.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from . import config as config_lib
from .runtime import barrier, is_main_process

FORMAT_VERSION = 1
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or was made with a different config."""


class StageBusyError(ArtifactError):
    """Another process is writing this stage, and the caller asked not to wait."""


class ConfigMismatchError(ArtifactError):
    """A stored config differs from the expected one; `.differences` lists the fields as
    'path: stored != expected'."""

    def __init__(self, path: Path, differences: list[str], advice: str = ""):
        self.path, self.differences = path, differences
        lines = "\n  ".join(differences)
        advice = advice or "Use another artifacts folder, or retrain this stage (retrain=True)."
        super().__init__(f"{path} was made with a different config (stored != expected):\n  {lines}\n{advice}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files (`.<name>.<pid>.<random>.tmp`) that writers which have since
    died (a SIGKILL mid-write) left in `folder`; a live writer's are left alone."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # [".<name>", "<pid>", "<random>", "tmp"]
        if len(parts) == 4 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inject_fault(path: Path) -> None:
    """For the fault tests only: UNCLIP_KILL_AT_WRITE=<path suffix> SIGKILLs this process once the
    matching file's temporary copy is written and before it replaces the file (the worst moment)."""
    target = os.environ.get("UNCLIP_KILL_AT_WRITE")
    if target and path.as_posix().endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: Path, write) -> None:
    """`write(tmp)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    folder. The file gets the mode an ordinary open() gives (0666 less the umask), so other users
    and containers can read the artifacts; temporary files of dead writers are removed first."""
    if not is_main_process():  # under torchrun rank 0 alone writes; the others hold the same values
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        _inject_fault(path)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create their file 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically (see `_atomic_write`)."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, shared storage copied apart (what safetensors stores)."""
    clean, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.numel() and v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        clean[k] = v
    return clean


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (shared storage is copied apart)."""
    clean = _storable(tensors)
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
# One writer per stage folder

_HELD: set[Path] = set()  # the lock files this process holds (stage_lock is re-entrant)


def lock_path(folder: str | Path) -> Path:
    """The lock file of a stage folder: beside it, so that it outlives the folder being moved aside."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that did not say which"


@contextlib.contextmanager
def stage_lock(folder: str | Path, exclusive: bool = True, wait: bool = True):
    """Hold the stage folder's advisory lock (fcntl.flock): exclusive while a stage is trained,
    saved or moved aside; shared while it is read, so that no reader sees half of a save.

    A process that wants a lock another holds waits, saying who holds it (PID and command), or
    with `wait=False` raises StageBusyError with that message. A lock dies with its holder,
    so a killed writer's lock is simply taken over. Re-entrant within one process."""
    path = lock_path(folder)
    if not is_main_process():  # under torchrun rank 0 holds the lock for all ranks (it alone writes)
        yield
        return
    if path in _HELD:  # this process holds it already (a load inside ensure_stage, say)
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError:
        if exclusive:
            raise
        yield  # a read-only folder (a shipped artifact): nobody can be writing it
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(path)
            message = f"{Path(folder).name}: another process is writing this stage ({who}); lock file {path}"
            if not wait:
                raise StageBusyError(message + ". Wait for it, or use another artifacts folder.") from None
            print(message + "; waiting for it to finish", flush=True)
            fcntl.flock(f, mode)
        if exclusive:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n")
            f.flush()
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            if exclusive:
                f.seek(0)
                f.truncate()
                f.flush()
    finally:
        f.close()  # releases the lock


# ---------------------------------------------------------------------------------------------
# Stage artifacts


def save_stage(folder: str | Path, stage: str, state_dict: dict[str, torch.Tensor], config,
               metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a stage's artifact: weights, config (with the stage name) and metrics.

    `config` is a dataclass config or a dict; `extra` holds more JSON-able facts for config.json
    (for example the CLIP model a stage was trained against). The device and precision it was
    trained in (from `metrics["train"]`) go into config.json as "runtime".
    """
    folder = Path(folder)
    cfg = config_lib.to_dict(config) if not isinstance(config, dict) else config
    trained = (metrics or {}).get("train") or {}
    if "precision" in trained and "device" in trained:  # where and how it was trained: recorded
        extra = {"runtime": {"device": str(trained["device"]), "precision": trained["precision"]}, **(extra or {})}
    with stage_lock(folder):  # readers wait for all three files
        save_tensors(folder / WEIGHTS, state_dict)
        write_json(folder / CONFIG, {"stage": stage, "format_version": FORMAT_VERSION, "config": cfg,
                                     **(extra or {})})
        write_json(folder / METRICS, {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      **(metrics or {})})
    barrier()  # under torchrun: the other ranks read the stage only once rank 0 has written it
    return folder


def archive_stage(folder: str | Path) -> Path:
    """Move a stage folder aside (to `<name>.stale-<UTC time>`) so nothing saved is lost."""
    folder = Path(folder)
    if not is_main_process():  # rank 0 moves it; the others only learn the name
        return folder.with_name(f"{folder.name}.stale-(moved by rank 0)")
    with stage_lock(folder):
        stamp = f"{folder.name}.stale-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        target, n = folder.with_name(stamp), 1
        while target.exists():  # two moves within one second
            n += 1
            target = folder.with_name(f"{stamp}-{n}")
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
    with stage_lock(folder, exclusive=False):  # never half of another process's save
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
    """Identifies a model's weights (12 hex digits of a sha1). Given `state_dict`, the weights in
    memory: the sha1 of the bytes `save_stage` would write for them, so a model loaded from a
    stage folder has the fingerprint of that folder's weights file, and a model changed in
    memory since has another. Given `folder`, the weights file stored there now. Later stages
    record their CLIP's fingerprint and check it when they load."""
    h = hashlib.sha1()
    if state_dict is not None:
        h.update(safetensors_bytes(_storable(state_dict)))
    elif folder is not None and (Path(folder) / WEIGHTS).exists():
        with open(Path(folder) / WEIGHTS, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        raise ValueError("fingerprint needs a state_dict or a folder holding weights")
    return h.hexdigest()[:12]
