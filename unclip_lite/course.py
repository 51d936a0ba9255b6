"""The course runner: executes ``notebooks/NN_*.ipynb`` in order with papermill.

    python -m unclip_lite course [--preset course] [--artifacts build/artifacts] [--only 01 02] [--data DIR]

Every notebook gets the same parameters (``preset``, ``artifacts_dir``, ``progress=False``) and
writes its executed copy to ``build/executed/``; ``--data DIR`` (a caption folder) goes to the
notebooks that take a ``data`` parameter (13; the others are about ShapesWorld). Notebooks share results only through the
artifacts folder. The runner stops at the first failure and shows the failing cell, prints a
table (time, status, key metric), and ends with the line ``N passed, N failed``.

A notebook opens with `opening(...)` (the course map, and how long the notebook took in a
recorded course run) and reports its key metric with `report(...)` in its last cell. The runner
writes every notebook's time to ``<out>/timings.json``; ``data/course_times.json`` is such a file
from a course run (on the machine it names), which `opening` quotes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import write_json
from .config import PRESETS, Preset, get_preset
from .runtime import machine_description, seed_everything

SUMMARY_DIR = "course"
TIMES_FILE = Path(__file__).resolve().parents[1] / "data" / "course_times.json"  # a recorded course run's timings.json


def setup(preset: str, seed: int, artifacts_dir: str | Path) -> tuple[Preset, str]:
    """The first lines of every notebook: the preset's config with the world seeded by `seed`,
    every random generator seeded, and the cache folder inside the artifacts folder.
    Returns (cfg, cache_dir)."""
    cfg = get_preset(preset)
    cfg.world = dataclasses.replace(cfg.world, seed=seed)
    seed_everything(seed)
    return cfg, f"{artifacts_dir}/cache"


def measured_time(notebook: str, times_file: str | Path = TIMES_FILE) -> str:
    """How long `notebook` (e.g. "03_decoder") took in the recorded course run, as a sentence."""
    try:
        times = json.loads(Path(times_file).read_text())
        seconds = times["notebooks"][notebook]
    except (OSError, ValueError, KeyError):
        return f"(no recorded time for {notebook} in {Path(times_file).name})"
    speed = times.get("decoder_images_per_s")
    machine = times.get("machine", "the machine that recorded it")
    return (f"Measured time: {seconds / 60:.1f} minutes at the {times['preset']!r} preset on {machine} "
            f"({times['date']}" + (f"; that day its course decoder trained at {speed:.0f} images/s" if speed else "")
            + "), running the notebooks in order in one course run.")


def opening(notebook: str, what: str, times_file: str | Path = TIMES_FILE) -> None:
    """The first cell of every notebook: the course map with this notebook's boxes highlighted
    (`plotting.pipeline_map`) and its measured time (`measured_time`)."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    from .plotting import pipeline_map

    fig = pipeline_map(notebook[:2], title=f"notebook {notebook[:2]}: {what} (highlighted)")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)  # shown once, here: before `%matplotlib inline` a plt.show() would surface it under a later cell
    display(Image(png.getvalue()))
    print(measured_time(notebook, times_file))


def report(artifacts_dir: str | Path, notebook: str, key_metric: str, **metrics) -> None:
    """Record a notebook's key metric (a short human-readable string) for the course table, and
    print it as the notebook's closing summary."""
    data = {"notebook": notebook, "key_metric": key_metric, **metrics}
    write_json(Path(artifacts_dir) / SUMMARY_DIR / f"{notebook}.json", data)
    print(f"What you saw in {notebook}: {key_metric}")


def write_timings(results: list["NotebookResult"], out_dir: str | Path, artifacts_dir: str | Path, preset: str) -> Path:
    """`<out_dir>/timings.json`: each passed notebook's seconds, the preset, the date, the machine and
    the day's speed (the decoder's training images/s, when its artifact is in `artifacts_dir`)."""
    speed = None
    try:
        speed = json.loads((Path(artifacts_dir) / "decoder" / "metrics.json").read_text())["train"]["samples_per_s"]
    except (OSError, ValueError, KeyError):
        pass
    path = Path(out_dir) / "timings.json"
    write_json(path, {"preset": preset, "date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
                      "decoder_images_per_s": speed,
                      "notebooks": {r.name: round(r.seconds, 1) for r in results if r.status == "passed"}})
    return path


@dataclass
class NotebookResult:
    name: str
    status: str  # "passed" | "failed" | "not run"
    seconds: float = 0.0
    key_metric: str = ""
    error: str = ""


def discover(notebooks_dir: str | Path, only: list[str] | None = None) -> list[Path]:
    """The course notebooks NN_*.ipynb in reading order; `only` keeps those whose name starts
    with one of the given prefixes (e.g. ["01", "03"])."""
    paths = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
    return paths


def takes_parameter(notebook: Path, name: str) -> bool:
    """Whether the notebook's parameters cell (tagged "parameters") assigns `name`."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    lines = "".join(cell["source"]).splitlines() if cell else []
    return any(line.split(":")[0].split("=")[0].strip() == name for line in lines)


def _failing_cell(exc, output: Path) -> str:
    """A readable description of the cell that failed, from papermill's error and the output."""
    lines = [f"{getattr(exc, 'ename', type(exc).__name__)}: {getattr(exc, 'evalue', exc)}"]
    try:
        nb = json.loads(output.read_text())
        code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
        failed = next((c for c in code_cells
                       if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        if failed is not None:
            src = "".join(failed["source"])
            lines.insert(0, "failing cell:\n    " + src.replace("\n", "\n    "))
    except (OSError, ValueError, KeyError):
        pass
    return "\n".join(lines)


def run_course(notebooks_dir: str | Path = "notebooks", out_dir: str | Path = "build/executed",
               artifacts_dir: str | Path = "build/artifacts", preset: str = "course",
               only: list[str] | None = None, stream=sys.stdout, data: str | None = None) -> list[NotebookResult]:
    """Run the notebooks in order; stop at the first failure. Returns one result per notebook."""
    import papermill as pm

    notebooks = discover(notebooks_dir, only)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks matching NN_*.ipynb in {notebooks_dir}")
    out_dir, artifacts_dir = Path(out_dir).resolve(), Path(artifacts_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[NotebookResult] = []
    failed = False
    for nb in notebooks:
        if failed:
            results.append(NotebookResult(nb.stem, "not run"))
            continue
        summary = artifacts_dir / SUMMARY_DIR / f"{nb.stem}.json"
        summary.unlink(missing_ok=True)
        output = out_dir / nb.name
        print(f"[course] running {nb.name} (preset={preset})", file=stream, flush=True)
        parameters = {"preset": preset, "artifacts_dir": str(artifacts_dir), "progress": False}
        if data is not None and takes_parameter(nb, "data"):
            parameters["data"] = str(Path(data).resolve())
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(output), kernel_name="python3", progress_bar=False,
                                cwd=str(nb.parent.resolve()), parameters=parameters)
            key = json.loads(summary.read_text())["key_metric"] if summary.exists() else "(none reported)"
            results.append(NotebookResult(nb.stem, "passed", time.perf_counter() - t0, key))
        except Exception as exc:  # papermill's PapermillExecutionError, or a kernel that died
            failed = True
            results.append(NotebookResult(nb.stem, "failed", time.perf_counter() - t0,
                                          error=_failing_cell(exc, output)))
            print(f"[course] {nb.name} FAILED\n{results[-1].error}", file=stream, flush=True)
        print(f"[course] {nb.name}: {results[-1].status} in {results[-1].seconds:.0f}s", file=stream, flush=True)
    write_timings(results, out_dir, artifacts_dir, preset)
    print_table(results, stream)
    return results


def print_table(results: list[NotebookResult], stream=sys.stdout) -> None:
    width = max(len(r.name) for r in results)
    print(f"\n{'notebook':<{width}}  {'time':>7}  {'status':<7}  key metric", file=stream)
    print("-" * (width + 40), file=stream)
    for r in results:
        t = f"{r.seconds:6.0f}s" if r.status != "not run" else "      -"
        print(f"{r.name:<{width}}  {t}  {r.status:<7}  {r.key_metric}", file=stream)
    passed = sum(r.status == "passed" for r in results)
    failed = sum(r.status == "failed" for r in results)
    not_run = sum(r.status == "not run" for r in results)
    if not_run:
        print(f"({not_run} notebook(s) not run after the failure)", file=stream)
    print(f"\n{passed} passed, {failed} failed", file=stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unclip_lite course", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="course", help="smoke | course | gpu (default: course)")
    parser.add_argument("--notebooks", default="notebooks", help="folder of NN_*.ipynb")
    parser.add_argument("--out", default="build/executed", help="where executed notebooks go")
    parser.add_argument("--artifacts", default="build/artifacts", help="the shared artifacts folder")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose names start with these")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a caption folder for the notebooks that take one (13: your own images)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    if not discover(args.notebooks, args.only):
        parser.error(f"no notebooks NN_*.ipynb{' matching ' + str(args.only) if args.only else ''} in "
                     f"{Path(args.notebooks).resolve()} (run from the repository root, or pass --notebooks)")
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: no such folder")
    results = run_course(args.notebooks, args.out, args.artifacts, args.preset, args.only, data=args.data)
    return 0 if all(r.status == "passed" for r in results) else 1
