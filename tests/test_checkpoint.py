import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from unclip_lite import checkpoint as ckpt
from unclip_lite.config import get_preset


def test_stage_round_trip_is_self_describing(tmp_path):
    model = torch.nn.Linear(3, 2)
    preset = get_preset("smoke")
    ckpt.save_stage(tmp_path / "s", "toy", model.state_dict(), preset.judge, {"acc": 0.5})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    state, meta, metrics = ckpt.load_stage(tmp_path / "s", "toy", preset.judge)
    assert torch.equal(state["weight"], model.weight.detach())
    assert meta["stage"] == "toy" and meta["config"]["width"] == preset.judge.width
    assert metrics["acc"] == 0.5 and "created" in metrics


def test_config_mismatch_names_each_field(tmp_path):
    preset = get_preset("smoke")
    ckpt.save_stage(tmp_path, "toy", {"w": torch.zeros(1)}, preset.judge)
    other = get_preset("smoke").judge
    other.width, other.train.lr = 99, 0.5
    with pytest.raises(ckpt.ConfigMismatchError) as err:
        ckpt.load_stage(tmp_path, "toy", other)
    assert err.value.differences == [f"train.lr: {preset.judge.train.lr!r} != 0.5", f"width: {preset.judge.width} != 99"]
    assert "width: 8 != 99" in str(err.value)


def test_missing_and_wrong_stage_errors(tmp_path):
    with pytest.raises(ckpt.ArtifactError, match="does not exist"):
        ckpt.load_stage(tmp_path / "nope", "toy")
    ckpt.save_stage(tmp_path, "toy", {"w": torch.zeros(1)}, {"a": 1})
    with pytest.raises(ckpt.ArtifactError, match="holds stage 'toy', expected 'judge'"):
        ckpt.load_stage(tmp_path, "judge")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.ArtifactError, match="not a readable safetensors file"):
        ckpt.load_stage(tmp_path, "toy")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    ckpt.write_json(path, {"v": 1})

    class Boom:  # json.dump fails half-way through
        pass
    with pytest.raises(TypeError):
        ckpt.write_json(path, {"v": 2, "bad": Boom()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_artifacts_get_the_umask_mode_and_dead_writers_temporaries_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.save_stage(tmp_path / "s", "toy", {"w": torch.ones(2)}, {"a": 1}, metrics={"m": 1})
    finally:
        os.umask(old)
    for name in (ckpt.WEIGHTS, ckpt.CONFIG, ckpt.METRICS):  # readable by others, as open() would make it
        assert stat.S_IMODE((tmp_path / "s" / name).stat().st_mode) == 0o644, name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its writer was killed mid-write
    stale = tmp_path / "s" / f".model.safetensors.{dead.pid}.0badc0de.tmp"
    live = tmp_path / "s" / f".metrics.json.{os.getpid()}.0000beef.tmp"  # a live writer's: kept
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"{")
    ckpt.write_json(tmp_path / "s" / ckpt.METRICS, {"m": 2})
    assert not stale.exists() and live.exists()


def test_nested_training_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "history": [[1, 0.5]], "rng": torch.get_rng_state()}
    ckpt.save_state(tmp_path / "s.safetensors", state)
    back = ckpt.load_state(tmp_path / "s.safetensors")
    assert back["step"] == 7 and back["history"] == [[1, 0.5]]
    assert torch.equal(back["rng"], state["rng"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])  # loads cleanly into a fresh optimiser
    assert b"pickle" not in (tmp_path / "s.safetensors").read_bytes()[:64]
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.save_state(tmp_path / "x.safetensors", {"f": object()})


def test_the_device_and_precision_a_stage_was_trained_in_are_in_its_config(tmp_path):
    ckpt.save_stage(tmp_path / "s", "toy", {"w": torch.ones(2)}, {"a": 1},
                    metrics={"train": {"steps": 3, "device": "cpu", "precision": "bf16"}})
    assert ckpt.read_json(tmp_path / "s" / ckpt.CONFIG)["runtime"] == {"device": "cpu", "precision": "bf16"}
