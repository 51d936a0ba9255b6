import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from unclip_lite.course import discover, run_course


def _nb(path, *sources):
    cells = [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
              "source": src} for i, src in enumerate(sources)]
    cells[0]["metadata"]["tags"] = ["parameters"]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}))


@pytest.mark.slow
def test_runner_stops_at_first_failure_and_prints_the_table(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    params = 'preset = "x"\nartifacts_dir = "."\nprogress = True'
    report = "from unclip_lite.course import report\nreport(artifacts_dir, '01_ok', 'answer 42')"
    _nb(nbs / "01_ok.ipynb", params, report)
    _nb(nbs / "02_bad.ipynb", params, "x = 1", "raise ValueError('the judge is blind')")
    _nb(nbs / "03_never.ipynb", params, "pass")
    (nbs / "notes.ipynb").write_text("{}")  # not NN_*: ignored
    assert [p.name for p in discover(nbs)] == ["01_ok.ipynb", "02_bad.ipynb", "03_never.ipynb"]
    out = io.StringIO()
    results = run_course(nbs, tmp_path / "executed", tmp_path / "artifacts", preset="smoke", stream=out)
    assert [r.status for r in results] == ["passed", "failed", "not run"]
    assert results[0].key_metric == "answer 42"
    text = out.getvalue()
    assert "raise ValueError('the judge is blind')" in text and "ValueError: the judge is blind" in text
    assert "01_ok" in text and "answer 42" in text
    assert text.rstrip().splitlines()[-1] == "1 passed, 1 failed"
    assert "03_never" in text and "not run" in text
    assert (tmp_path / "executed" / "01_ok.ipynb").exists()
    executed = json.loads((tmp_path / "executed" / "01_ok.ipynb").read_text())
    injected = "".join(executed["cells"][1]["source"])  # papermill's injected parameters cell
    assert '"smoke"' in injected and str(tmp_path / "artifacts") in injected


def test_cli_help_and_unknown_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "unclip_lite", "course", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--preset" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "unclip_lite", "dance"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


@pytest.mark.slow
def test_the_course_runs_every_notebook_at_course_defaults():
    """The real thing: every notebook, course preset, shared artifacts in build/artifacts."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "unclip_lite", "course", "--preset", "course",
                           "--artifacts", str(ROOT / "build" / "artifacts"), "--out", str(ROOT / "build" / "executed"),
                           "--notebooks", str(ROOT / "notebooks")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    n = len(discover(ROOT / "notebooks"))
    assert proc.returncode == 0
    assert proc.stdout.rstrip().splitlines()[-1] == f"{n} passed, 0 failed"


def test_every_notebook_runs_at_the_smoke_preset(tmp_path):
    """Seconds per notebook: catches a broken notebook long before the course-scale run."""
    out = io.StringIO()
    results = run_course(ROOT / "notebooks", tmp_path / "executed", tmp_path / "artifacts", preset="smoke", stream=out)
    assert [r.status for r in results] == ["passed"] * len(results), out.getvalue()[-3000:]
    for path in sorted((tmp_path / "executed").glob("*.ipynb")):  # the map shows under the opening cell, not later
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        first = next(c for c in cells if "opening(" in "".join(c["source"]))
        assert any("image/png" in o.get("data", {}) for o in first["outputs"]), f"{path.name}: no map under opening()"


def test_every_notebook_opens_with_the_map_and_closes_with_what_comes_next():
    from unclip_lite.plotting import NOTEBOOK_STAGES

    for path in discover(ROOT / "notebooks"):
        cells = json.loads(path.read_text())["cells"]
        number, name = path.stem[:2], path.stem
        assert number in NOTEBOOK_STAGES, f"{path.name}: no boxes in plotting.NOTEBOOK_STAGES"
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        assert any(f'opening("{name}"' in src for src in code[:3]), f"{path.name}: no opening(...) cell near the top"
        last = "".join(cells[-1]["source"])
        assert cells[-1]["cell_type"] == "markdown" and last.startswith(("**Next", "**The end of the course")), f"{path.name}: last cell {last[:60]!r}"
        if number >= "02":  # an exercise in every notebook from 02 on
            assert any(c["cell_type"] == "markdown" and "".join(c["source"]).startswith("**Try this.**") for c in cells), \
                f"{path.name}: no **Try this.** cell"


def test_the_readme_table_lists_every_notebook_in_order():
    readme = (ROOT / "README.md").read_text()
    rows = [line.split("`")[1] for line in readme.splitlines() if line.startswith("| `") and ".ipynb` |" in line]
    assert rows == [p.name for p in discover(ROOT / "notebooks")]


def test_the_map_highlights_a_notebooks_boxes_and_names_an_unknown_one():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unclip_lite.plotting import MAP_BOXES, NOTEBOOK_STAGES, pipeline_map

    for number, boxes in NOTEBOOK_STAGES.items():
        assert set(boxes) <= set(MAP_BOXES), number
        fig = pipeline_map(number)
        bold = {t.get_text() for t in fig.axes[0].texts if t.get_fontweight() == "bold"}
        assert bold == {MAP_BOXES[b][0] for b in boxes}, number
        plt.close(fig)
    with pytest.raises(ValueError, match="'vae'"):
        pipeline_map(("decoder", "vae"))


def test_timings_round_trip_into_the_opening_sentence(tmp_path):
    from unclip_lite.course import NotebookResult, measured_time, write_timings

    (tmp_path / "art" / "decoder").mkdir(parents=True)
    (tmp_path / "art" / "decoder" / "metrics.json").write_text(json.dumps({"train": {"samples_per_s": 123.4}}))
    results = [NotebookResult("03_decoder", "passed", 612.0), NotebookResult("04_prior", "failed", 5.0)]
    path = write_timings(results, tmp_path, tmp_path / "art", "course")
    saved = json.loads(path.read_text())
    assert saved["notebooks"] == {"03_decoder": 612.0} and saved["decoder_images_per_s"] == 123.4
    assert saved["machine"] and saved["date"]
    text = measured_time("03_decoder", path)
    assert "10.2 minutes" in text and "'course'" in text and "123 images/s" in text and saved["machine"] in text
    assert "no recorded time" in measured_time("04_prior", path)
    assert "no recorded time" in measured_time("03_decoder", tmp_path / "missing.json")
