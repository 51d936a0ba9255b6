import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from unclip_lite import checkpoint as ckpt
from unclip_lite.config import TrainConfig
from unclip_lite.runtime import resolve_precision, seed_everything
from unclip_lite.train import STATE_FILE, NonFiniteLossError, clear_state, lr_at, train

CHILD = ROOT / "tests" / "train_child.py"


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def get_batch(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(32, 4, generator=g)
        return x, (x @ w)[:, None]

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(m(x).float(), y), {"mse": 0.0}
    return model, loss_fn, get_batch


def test_training_reduces_the_loss_and_records_speed():
    model, loss_fn, get_batch = _toy()
    cfg = TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, log_every=10, ema_decay=0.9)
    m = train(model, loss_fn, get_batch, cfg, progress=False)
    assert m["loss_history"][-1][1] < 0.1 * m["loss_history"][0][1]
    assert m["samples_per_s"] > 0 and m["precision"] in ("bf16", "fp32") and m["steps"] == 150
    assert not model.training  # returned in eval mode, holding the EMA weights


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        model, loss_fn, get_batch = _toy(seed=1)
        train(model, loss_fn, get_batch, TrainConfig(steps=20, precision="fp32", log_every=5), progress=False)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    seed_everything(3)
    a = torch.randn(3)
    seed_everything(3)
    assert torch.equal(a, torch.randn(3))


def test_model_ends_with_the_ema_weights():
    model, loss_fn, get_batch = _toy()
    cfg = TrainConfig(steps=30, lr=1e-2, ema_decay=0.0, precision="fp32", log_every=5)  # EMA == last weights
    train(model, loss_fn, get_batch, cfg, progress=False)
    model2, *_ = _toy()
    cfg_slow = TrainConfig(steps=30, lr=1e-2, ema_decay=1.0, precision="fp32", log_every=5)  # EMA == init
    init = [p.detach().clone() for p in model2.parameters()]
    train(model2, loss_fn, get_batch, cfg_slow, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(init, model2.parameters()))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(50, cfg) < lr_at(20, cfg)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    model, loss_fn, get_batch = _toy()

    def bad_loss(m, batch):
        loss, logs = loss_fn(m, batch)
        return (loss * float("nan"), logs) if bad_loss.calls_left == 0 else (bad_loss.tick(loss), logs)
    bad_loss.calls_left = 12

    def tick(loss):
        bad_loss.calls_left -= 1
        return loss
    bad_loss.tick = tick
    cfg = TrainConfig(steps=50, checkpoint_every=5, log_every=5, precision="fp32")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 12.*last good checkpoint is kept at .*"
                                                 r"train_state.safetensors"):
        train(model, bad_loss, get_batch, cfg, run_dir=tmp_path, progress=False)
    state = ckpt.load_state(tmp_path / STATE_FILE)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_refuses_a_different_config_but_allows_more_steps(tmp_path):
    model, loss_fn, get_batch = _toy()
    cfg = TrainConfig(steps=10, checkpoint_every=5, log_every=5, precision="fp32")
    train(model, loss_fn, get_batch, cfg, run_dir=tmp_path, progress=False, run_config={"width": 4})
    model, *_ = _toy()
    with pytest.raises(ckpt.ConfigMismatchError, match=r"train_state.safetensors was made with a different config "
                                                       r"\(stored != expected\):\n  run.width: 4 != 8\n.*delete"):
        train(model, loss_fn, get_batch, cfg, run_dir=tmp_path, progress=False, run_config={"width": 8})
    longer = TrainConfig(steps=15, checkpoint_every=5, log_every=5, precision="fp32")
    m = train(model, loss_fn, get_batch, longer, run_dir=tmp_path, progress=False, run_config={"width": 4})
    assert m["resumed_from"] == 10


def test_resume_refuses_another_precision_naming_both(tmp_path, monkeypatch):
    """precision="auto" resolves per machine: a checkpoint begun in fp32 must not go on in bf16."""
    model, loss_fn, get_batch = _toy()
    cfg = TrainConfig(steps=10, checkpoint_every=5, log_every=5, precision="auto")
    monkeypatch.setenv("UNCLIP_PRECISION", "fp32")
    train(model, loss_fn, get_batch, cfg, run_dir=tmp_path, progress=False, stop_after=5)
    assert ckpt.load_state(tmp_path / STATE_FILE)["runtime"] == {"device": "cpu", "precision": "fp32"}
    monkeypatch.setenv("UNCLIP_PRECISION", "bf16")
    with pytest.raises(ckpt.ArtifactError, match=r"interrupted run on cpu in fp32; this process runs on cpu in bf16"):
        train(model, loss_fn, get_batch, cfg, run_dir=tmp_path, progress=False)
    monkeypatch.setenv("UNCLIP_PRECISION", "fp32")
    assert train(model, loss_fn, get_batch, cfg, run_dir=tmp_path, progress=False)["resumed_from"] == 5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path, precision):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = 120
    straight = subprocess.run([sys.executable, str(CHILD), str(tmp_path / "straight"), str(steps), precision], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
    tmp_path = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path), str(steps), precision], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_path = Path(tmp_path) / STATE_FILE
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state_path.exists():
            try:
                killed_at = ckpt.load_state(state_path)["step"]
            except ckpt.ArtifactError:
                killed_at = None  # caught mid-replace; os.replace makes this impossible, but be safe
            if killed_at is not None and killed_at >= 20:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    # the checkpoint on disk is whole and at least as far as when we looked
    state = ckpt.load_state(state_path)
    assert killed_at <= state["step"] < steps
    leftovers = [p.name for p in Path(tmp_path).iterdir() if p.name != STATE_FILE]
    assert all(name.endswith(".tmp") for name in leftovers)
    done = subprocess.run([sys.executable, str(CHILD), str(tmp_path), str(steps), precision], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["resumed_from"] == state["step"]
    # bitwise the weights of the run that was never interrupted, and the same loss history
    reference = json.loads(straight.stdout.strip().splitlines()[-1])
    assert out["weights_sha1"] == reference["weights_sha1"] and out["history"] == reference["history"]
    history_steps = [h[0] for h in out["history"]]
    assert history_steps == sorted(set(history_steps)) and history_steps[-1] == steps  # no step counted twice
    assert out["final_loss"] < out["history"][0][1]
    # the final checkpoint stays until the caller has saved its artifact; a rerun then trains nothing
    assert ckpt.load_state(state_path)["step"] == steps
    again = subprocess.run([sys.executable, str(CHILD), str(tmp_path), str(steps), precision], env=env,
                           capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_from"] == steps
    clear_state(tmp_path)
    assert not state_path.exists()


def test_precision_choice():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(ValueError):
        resolve_precision("fp8")


def test_stop_after_trains_the_start_of_the_schedule_and_snapshots_match_it(tmp_path):
    """A run stopped after k steps of an n-step schedule holds the weights that the full run's
    snapshot at step k holds: the matched-compute comparison of notebook 12 relies on this."""
    from unclip_lite.train import snapshot_path
    cfg = TrainConfig(steps=30, batch_size=32, lr=1e-2, warmup_steps=5, log_every=5, ema_decay=0.9,
                      precision="fp32", checkpoint_every=0)
    full, loss_fn, get_batch = _toy(seed=2)
    m_full = train(full, loss_fn, get_batch, cfg, run_dir=tmp_path / "full", progress=False, snapshot_steps=(10,))
    short, loss_fn, get_batch = _toy(seed=2)
    m_short = train(short, loss_fn, get_batch, cfg, progress=False, stop_after=10)
    assert m_short["steps"] == 10 and m_short["schedule_steps"] == 30 and m_full["steps"] == 30
    snap = ckpt.load_tensors(snapshot_path(tmp_path / "full", 10))
    for k, v in short.state_dict().items():
        assert torch.allclose(v, snap[k]), k
    assert not torch.allclose(full.state_dict()["0.weight"], snap["0.weight"])
    with pytest.raises(ValueError, match="stop_after must lie in 1..steps"):
        train(short, loss_fn, get_batch, cfg, progress=False, stop_after=31)
