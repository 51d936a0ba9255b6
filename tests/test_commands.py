"""`python -m unclip_lite train STAGE` and the `--set` overrides it is built on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unclip_lite.commands import STAGES, apply_overrides, train_main
from unclip_lite.config import get_preset, set_field
from unclip_lite.checkpoint import stage_exists, read_json

ROOT = Path(__file__).resolve().parents[1]


def test_set_field_converts_to_the_field_type():
    p = get_preset("course")
    q = set_field(p, "decoder.train.steps", "4000")
    assert q.decoder.train.steps == 4000 and p.decoder.train.steps == 2200  # a copy; the original is untouched
    assert set_field(p, "decoder.compare_steps", "[10, 25]").decoder.compare_steps == (10, 25)
    assert set_field(p, "decoder.min_snr_gamma", "null").decoder.min_snr_gamma is None
    assert set_field(p, "decoder.objective", "eps").decoder.objective == "eps"  # a plain string
    assert set_field(p, "decoder.train.lr", "0.004").decoder.train.lr == 0.004


def test_set_field_names_what_is_wrong():
    p = get_preset("course")
    with pytest.raises(ValueError, match="no field 'stepz'.*steps"):
        set_field(p, "decoder.train.stepz", "1")
    with pytest.raises(ValueError, match="expected int"):
        set_field(p, "decoder.train.steps", "many")
    with pytest.raises(ValueError, match="no sub-fields"):
        set_field(p, "decoder.objective.kind", "v")
    with pytest.raises(SystemExit, match="expected PATH=VALUE"):
        apply_overrides(p, ["decoder.train.steps"])


def test_help_lists_the_stages_and_presets():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "unclip_lite", "train", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert all(stage in text for stage in STAGES) and "smoke" in text and "gpu" in text


def test_train_a_stage_with_an_override(tmp_path, capsys):
    assert train_main(["judge", "--preset", "smoke", "--artifacts", str(tmp_path), "--no-progress",
                       "--set", "judge.train.steps=7"]) == 0
    assert stage_exists(tmp_path / "judge")
    assert read_json(tmp_path / "judge" / "config.json")["config"]["judge"]["train"]["steps"] == 7
    assert '"steps": 7' in capsys.readouterr().out
