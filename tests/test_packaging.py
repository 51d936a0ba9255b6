import json
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import yaml

from conftest import ROOT


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "unclip-lite"
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith("-e")}
    assert listed == wanted
    assert any(p.startswith("-e") and "[dev]" in p for p in pip)


def test_runtime_dependencies_and_no_torch_pin():
    deps = _pyproject()["project"]["dependencies"]
    for name in ("torch", "open_clip_torch", "numpy", "pillow", "matplotlib", "ipywidgets", "jupyterlab",
                 "papermill", "ipykernel", "tqdm", "safetensors"):
        assert any(re.match(rf"{name}\b", d) for d in deps), name
    assert not any(d.startswith("torch") and "2.13" in d for d in deps)
    assert _pyproject()["project"]["requires-python"] == ">=3.10"


def test_ci_runs_make_test_and_nothing_else():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    commands = [ln for ln in lines if not ln.startswith(("set ", "cd "))]
    assert commands == ["make test"]


def test_makefile_targets_and_install_stamp():
    text = (ROOT / "Makefile").read_text()
    for target in ("course:", "test:", "test-fast:", "lab:", "bench:", "install:"):
        assert re.search(rf"^{target}", text, re.M), target
    assert "sha1sum pyproject.toml" in text  # the stamp is keyed on pyproject


def test_notebooks_are_committed_without_outputs_and_with_a_parameters_cell():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{path.name} has outputs"
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(params) == 1, f"{path.name}: one cell tagged parameters"
        src = "".join(params[0]["source"])
        for name in ("preset", "seed", "artifacts_dir", "progress"):
            assert re.search(rf"^{name}: \w+ = .+#", src, re.M), f"{path.name}: parameter {name} with type and comment"
        assert "%pip" not in "".join("".join(c["source"]) for c in code)


def test_readme_sections_come_in_order():
    text = (ROOT / "README.md").read_text()
    headings = [h.lower() for h in re.findall(r"^## (.+)$", text, re.M)]
    order = ["two commands", "what the course is", "hardware", "notebooks", "your own data"]
    positions = [next(i for i, h in enumerate(headings) if key in h) for key in order]
    assert positions == sorted(positions), headings
    assert "make course" in text and "make test" in text
