"""The one training loop under torchrun: DDP on gloo (CPU), launched by torchrun itself.

- 2 ranks x B/2 against 1 rank x B (fp32): the same loss history and weights;
- two "nodes" on loopback (two torchrun invocations, one rank each) train a stage to the end;
- a rank killed mid-run, then the same command again: it resumes from the last checkpoint.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from unclip_lite import checkpoint as ckpt

pytestmark = pytest.mark.slow
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
CHILD = str(ROOT / "tests" / "ddp_child.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, nproc=2, **kw):
    return [TORCHRUN, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={_port()}", *args]


def _train_upsampler(artifacts, launcher=()):
    cmd = [*launcher, *(["-m"] if launcher else [sys.executable, "-m"]), "unclip_lite", "train", "upsampler",
           "--preset", "smoke", "--artifacts", str(artifacts), "--set", "upsampler.train.precision=fp32", "--no-progress"]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def test_two_ranks_of_half_the_batch_train_as_one_rank_of_the_whole_batch(tmp_path):
    """The upsampler (GroupNorm only, so per-rank slices change nothing but the arithmetic's order)."""
    one = _train_upsampler(tmp_path / "one")
    two = _train_upsampler(tmp_path / "two", _torchrun())
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    m1 = ckpt.read_json(tmp_path / "one" / "upsampler" / ckpt.METRICS)["train"]
    m2 = ckpt.read_json(tmp_path / "two" / "upsampler" / ckpt.METRICS)["train"]
    assert m2["world_size"] == 2 and "world_size" not in m1
    h1, h2 = np.array(m1["loss_history"]), np.array(m2["loss_history"])
    assert np.array_equal(h1[:, 0], h2[:, 0])
    np.testing.assert_allclose(h2[:, 1], h1[:, 1], rtol=1e-6)  # measured 2026-12-05: 6e-8 relative
    w1 = ckpt.load_tensors(tmp_path / "one" / "upsampler" / ckpt.WEIGHTS)
    w2 = ckpt.load_tensors(tmp_path / "two" / "upsampler" / ckpt.WEIGHTS)
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst  # fp32 sums in another order; measured 6e-6 (weights up to 1.0)


def test_two_nodes_on_loopback_train_a_stage_to_the_end(tmp_path):
    """Two torchrun invocations, one rank each, meeting at a c10d rendezvous on 127.0.0.1: the smoke
    upsampler trains to the end, rank 0 (node 0) writes it, and it is the 1-rank stage."""
    port = _port()
    cmd = ["-m", "unclip_lite", "train", "upsampler", "--preset", "smoke", "--artifacts", str(tmp_path / "two"),
           "--set", "upsampler.train.precision=fp32", "--no-progress"]
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes=2", f"--node-rank={r}", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=unclip-test", *cmd],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    m2 = ckpt.read_json(tmp_path / "two" / "upsampler" / ckpt.METRICS)["train"]
    assert m2["world_size"] == 2 and m2["steps"] == m2["schedule_steps"]
    one = _train_upsampler(tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    m1 = ckpt.read_json(tmp_path / "one" / "upsampler" / ckpt.METRICS)["train"]
    np.testing.assert_allclose(np.array(m2["loss_history"]), np.array(m1["loss_history"]), rtol=1e-6)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_a_killed_rank_then_the_same_command_resumes_from_the_last_checkpoint(tmp_path):
    cmd = _torchrun(CHILD, str(tmp_path / "run"), "60", "16", str(tmp_path / "out.json"), "0.05")
    launcher = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "run" / "train_state.safetensors"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if state.exists() and ckpt.load_state(state)["step"] >= 10:
            break
        time.sleep(0.1)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    kept = ckpt.load_state(state)["step"]
    assert 10 <= kept < 60
    again = subprocess.run(_torchrun(CHILD, str(tmp_path / "run"), "60", "16", str(tmp_path / "out.json")),
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["resumed_from"] == kept and [h[0] for h in out["history"]] == list(range(1, 61))
    straight = subprocess.run([sys.executable, CHILD, str(tmp_path / "straight"), "60", "16", str(tmp_path / "s.json")],
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ref = json.loads((tmp_path / "s.json").read_text())
    np.testing.assert_allclose(np.array(out["history"]), np.array(ref["history"]), rtol=1e-5)  # nothing lost
