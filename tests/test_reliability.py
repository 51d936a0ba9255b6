"""Shared artifacts folders under real use: two processes, killed writers, file modes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from unclip_lite import checkpoint as ckpt
from unclip_lite.stage import ensure_stage

# A child that trains a toy "stage" slowly under ensure_stage: it holds the stage's lock meanwhile.
CHILD = """
import sys, time, torch
from unclip_lite import checkpoint as ckpt
from unclip_lite.stage import ensure_stage
folder, value = sys.argv[1], float(sys.argv[2])
def train_new():
    print("training", flush=True)
    time.sleep(float(sys.argv[3]))
    ckpt.save_stage(folder, "toy", {"w": torch.full((4,), value)}, {"v": 1})
    return value
ensure_stage(folder, "toy", lambda: ckpt.load_stage(folder, "toy")[0]["w"][0].item(), train_new)
"""


def _start(folder, value, seconds):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(value), str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "training"  # it holds the lock now
    return proc


def _load(folder):
    return ckpt.load_stage(folder, "toy")[0]["w"][0].item()


def test_a_second_process_refuses_or_waits_and_then_loads_the_first_ones_stage(tmp_path):
    folder = tmp_path / "toy"
    trained_here = []
    proc = _start(folder, 1.0, 3)
    with pytest.raises(ckpt.StageBusyError, match=rf"pid {proc.pid}: .*-c"):
        ensure_stage(folder, "toy", lambda: _load(folder), lambda: trained_here.append(1), wait=False)
    got = ensure_stage(folder, "toy", lambda: _load(folder), lambda: trained_here.append(1))  # waits
    assert proc.wait(timeout=30) == 0
    assert got == 1.0 and not trained_here  # loaded what the first process trained: one consistent stage
    assert torch.equal(ckpt.load_stage(folder, "toy")[0]["w"], torch.full((4,), 1.0))


def test_a_killed_writers_lock_is_taken_over(tmp_path):
    folder = tmp_path / "toy"
    proc = _start(folder, 1.0, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.perf_counter()
    got = ensure_stage(folder, "toy", lambda: _load(folder),
                       lambda: (ckpt.save_stage(folder, "toy", {"w": torch.full((4,), 2.0)}, {"v": 1}), 2.0)[1],
                       wait=False)
    assert got == 2.0 and time.perf_counter() - t0 < 5 and _load(folder) == 2.0


def test_a_reader_never_sees_half_of_a_save(tmp_path):
    """While a writer holds a stage (here: this process, mid-save), a reader in another process
    cannot take its shared lock: it waits, or refuses when asked not to wait."""
    folder = tmp_path / "toy"
    ckpt.save_stage(folder, "toy", {"w": torch.full((4,), 0.0)}, {"v": 0})
    code = ("import sys; from unclip_lite import checkpoint as c\n"
            "print(c.load_stage(sys.argv[1], 'toy')[0]['w'][0].item()) if sys.argv[2] == 'wait' else "
            "c.stage_lock(sys.argv[1], exclusive=False, wait=False).__enter__()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with ckpt.stage_lock(folder):
        refused = subprocess.run([sys.executable, "-c", code, str(folder), "nowait"], capture_output=True, text=True, env=env)
        assert refused.returncode != 0 and "StageBusyError" in refused.stderr and f"pid {os.getpid()}" in refused.stderr
        reader = subprocess.Popen([sys.executable, "-c", code, str(folder), "wait"], stdout=subprocess.PIPE, text=True, env=env)
        time.sleep(2)
        assert reader.poll() is None  # still waiting for the save to finish
        ckpt.save_stage(folder, "toy", {"w": torch.full((4,), 3.0)}, {"v": 3})
    assert reader.communicate(timeout=30)[0].strip().splitlines()[-1] == "3.0"  # the whole new stage


def test_two_moves_aside_within_one_second_both_keep_their_folders(tmp_path):
    kept = []
    for value in (1.0, 2.0):
        folder = tmp_path / "toy"
        ckpt.save_stage(folder, "toy", {"w": torch.full((4,), value)}, {"v": 1})
        kept.append(ckpt.archive_stage(folder))
    assert len(set(kept)) == 2 and all(_load(k) == v for k, v in zip(kept, (1.0, 2.0)))


# --- SIGKILL at the worst moment of each kind of write, then the same command again ---------------

def _train(stage, artifacts, kill_at=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("UNCLIP_KILL_AT_WRITE", None)
    if kill_at:
        env["UNCLIP_KILL_AT_WRITE"] = kill_at  # checkpoint._inject_fault: SIGKILL before that file's rename
    return subprocess.run([sys.executable, "-m", "unclip_lite", "train", stage, "--preset", "smoke",
                           "--artifacts", str(artifacts), "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _temporaries(folder):
    return list(folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted_upsampler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    clean = _train("upsampler", folder)
    assert clean.returncode == 0, clean.stderr[-2000:]
    return folder / "upsampler"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["upsampler/model.safetensors", "upsampler/config.json",
                                     "upsampler/metrics.json", "samples.json"])
def test_a_kill_during_a_stage_save_or_a_cache_write_then_a_rerun_gives_the_uninterrupted_stage(
        tmp_path, kill_at, uninterrupted_upsampler):
    """Killed mid-save (weights written, config not yet; or the render cache half written):
    the rerun finishes, the stage is whole and bitwise the stage of a run never interrupted."""
    killed = _train("upsampler", tmp_path / "run", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not ckpt.stage_exists(tmp_path / "run" / "upsampler")  # a half-saved stage is not a stage
    assert _temporaries(tmp_path / "run")  # the dead writer's temporary file is still there...
    again = _train("upsampler", tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    ours, ref = tmp_path / "run" / "upsampler", uninterrupted_upsampler
    assert ckpt.fingerprint(ours) == ckpt.fingerprint(ref)
    assert ckpt.read_json(ours / ckpt.CONFIG) == ckpt.read_json(ref / ckpt.CONFIG)
    assert not _temporaries(tmp_path / "run")  # ...until the rerun writes that folder again


@pytest.mark.slow
def test_a_kill_during_the_snapshot_write_keeps_the_snapshot_after_the_rerun(tmp_path, smoke_artifacts):
    """Notebook 12 compares the decoder with its own snapshot at baseline_steps: a kill while that
    snapshot is written must not lose it (the snapshot is written before the checkpoint)."""
    import shutil
    from unclip_lite.config import get_preset
    from unclip_lite.train import snapshot_path
    shutil.copytree(smoke_artifacts, tmp_path / "a", ignore=shutil.ignore_patterns("decoder*", ".*.lock"))
    step = get_preset("smoke").decoder.baseline_steps
    snap = snapshot_path(tmp_path / "a" / "decoder", step)
    killed = _train("decoder", tmp_path / "a", kill_at=f"decoder/snapshots/step_{step}.safetensors")
    assert killed.returncode == -signal.SIGKILL and not snap.exists(), killed.stderr[-2000:]
    again = _train("decoder", tmp_path / "a")
    assert again.returncode == 0, again.stderr[-2000:]
    ref = snapshot_path(smoke_artifacts / "decoder", step)
    assert ckpt.load_tensors(snap).keys() == ckpt.load_tensors(ref).keys()
    assert all(torch.equal(a, b) for a, b in zip(ckpt.load_tensors(snap).values(), ckpt.load_tensors(ref).values()))
    assert ckpt.fingerprint(tmp_path / "a" / "decoder") == ckpt.fingerprint(smoke_artifacts / "decoder")


@pytest.mark.slow
def test_a_notebook_killed_mid_training_then_rerun_passes(tmp_path):
    """The course runner (and the kernel under it) killed while notebook 02 trains the judge; the
    same command again resumes the judge from its checkpoint and the notebook passes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "unclip_lite", "course", "--preset", "smoke", "--only", "02",
           "--artifacts", str(tmp_path / "a"), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "a" / "judge" / "train_state.safetensors"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel
    proc.wait(timeout=30)
    assert state.exists(), "the judge wrote no checkpoint before the kill"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 0 failed" in done.stdout
    assert ckpt.read_json(tmp_path / "a" / "judge" / ckpt.METRICS)["train"]["resumed_from"] is not None


# --- bad input: refused with a message naming the argument, not guessed ---------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, r"batch_size = 0: must be an integer >= 1"),
    ({"steps": 0}, r"steps = 0: must be an integer >= 1"),
    ({"decoder_guidance_scale": float("nan")}, r"decoder_guidance_scale = nan: must be a finite number >= 0"),
    ({"prior_guidance_scale": -1.0}, r"prior_guidance_scale = -1.0: must be a finite number >= 0"),
    ({"seed": -1}, r"seed = -1: must be an integer in \[0, 2\*\*63\)"),
])
def test_generate_refuses_bad_arguments_by_name(smoke_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        smoke_pipe.generate(["a red circle"], progress=False, **kwargs)


def test_decode_refuses_a_count_mismatch_and_images_outside_the_convention(smoke_pipe):
    from unclip_lite import manipulate
    from unclip_lite.pipeline import PipelineError
    z = smoke_pipe.priors["diffusion"].sample(["a red circle"], seed=0)
    with pytest.raises(PipelineError, match="1 embeddings z_i but 2 captions"):
        smoke_pipe.decode(z, ["a red circle", "a blue square"], progress=False)
    with pytest.raises(ValueError, match=r"float images must lie in \[-1, 1\], got values in \[0, 255\]"):
        manipulate.invert(smoke_pipe, torch.linspace(0, 255, 3 * 32 * 32).view(1, 3, 32, 32))
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float in \\[-1, 1\\], got dtype torch.int64"):
        smoke_pipe.clip.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\), got \(3, 32, 32\)"):
        smoke_pipe.clip.encode_images(torch.zeros(3, 32, 32))


def test_config_json_and_train_settings_are_checked_field_by_field():
    from unclip_lite.config import TrainConfig, from_dict, to_dict
    data = to_dict(TrainConfig())
    with pytest.raises(ValueError, match=r"config field betas: expected 2 values, got 1: \[0.9\]"):
        from_dict(TrainConfig, {**data, "betas": [0.9]})
    with pytest.raises(ValueError, match=r"train.log_every = 0: must be an integer >= 1"):
        from_dict(TrainConfig, {**data, "log_every": 0})
    with pytest.raises(ValueError, match=r"train.lr = -0.001: must be a finite number > 0"):
        TrainConfig(lr=-1e-3)


def test_an_open_clip_model_without_a_clip_text_tower_is_refused_by_name():
    from types import SimpleNamespace

    from unclip_lite.clip_model import ClipModel

    class SiglipLike(torch.nn.Module):  # what ClipModel reads first, and no `transformer`
        visual = SimpleNamespace(image_size=32, image_mean=None, image_std=None)
        context_length = 16
    with pytest.raises(ValueError, match="'siglip-like' .* has no CLIP-style text tower"):
        ClipModel(SiglipLike(), "siglip-like", tokenizer=lambda texts: None)


def test_widget_headers_escape_captions(smoke_pipe):
    import ipywidgets as W

    from unclip_lite.widgets import InterpolationExplorer

    def html_values(w):
        own = [w.value] if isinstance(w, W.HTML) else []
        return own + [v for c in getattr(w, "children", ()) for v in html_values(c)]
    caption = "a red circle <img src=x onerror=alert(1)>"
    ex = InterpolationExplorer(smoke_pipe, caption, "a green square", steps=2)
    header = " ".join(html_values(ex.widget))
    assert "&lt;img src=x onerror=alert(1)&gt;" in header and "<img" not in header


def test_widgets_and_studies_refuse_bad_arguments_by_name(smoke_pipe):
    from unclip_lite.studies import claims, latents
    from unclip_lite.widgets import GuidanceExplorer, InterpolationExplorer
    with pytest.raises(ValueError, match=r"steps = 0: must be an integer >= 1"):
        InterpolationExplorer(smoke_pipe, "a red circle", "a green square", steps=0)
    with pytest.raises(ValueError, match=r"theta = nan"):
        InterpolationExplorer(smoke_pipe, "a red circle", "a green square", theta=float("nan"), steps=2)
    with pytest.raises(ValueError, match=r"n = 0: must be an integer >= 1"):
        GuidanceExplorer(smoke_pipe, "a red circle", n=0, steps=2)
    with pytest.raises(ValueError, match=r"n_variations = 0"):
        latents.variation_study(smoke_pipe, None, {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}, n_variations=0)
    with pytest.raises(ValueError, match=r"k = 1: must be an integer >= 2"):
        claims.Systems(smoke_pipe, None, {"val": ["a red circle"]}, 1, {"val": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match=r"seed = -3"):
        claims.sample_system(smoke_pipe, smoke_pipe.decoder, ["a red circle"], seed=-3)


def test_stage_config_fields_out_of_range_are_refused_from_json_and_from_the_command_line():
    from unclip_lite.commands import apply_overrides
    from unclip_lite.config import PRESETS, Preset, from_dict, get_preset, to_dict
    data = to_dict(get_preset("smoke"))
    data["decoder"]["sample_steps"] = 0
    with pytest.raises(ValueError, match=r"config field decoder.sample_steps = 0: must be an integer >= 1"):
        from_dict(Preset, data)
    with pytest.raises(SystemExit, match=r"prior.p_drop_text = 1.5: must be a probability in \[0, 1\]"):
        apply_overrides(get_preset("smoke"), ["prior.p_drop_text=1.5"])
    for name in PRESETS:  # every shipped preset passes
        from_dict(Preset, to_dict(get_preset(name)))


def test_the_embedding_cache_is_keyed_on_precision(smoke_pipe, tmp_path):
    from unclip_lite.clip import embedding_cache
    from unclip_lite.config import get_preset
    from unclip_lite.shapes import ShapesWorld
    clip = smoke_pipe.clip
    world = ShapesWorld("val", get_preset("smoke").world)
    kept = clip.precision
    try:
        for precision in ("fp32", "bf16"):
            clip.precision = precision
            embedding_cache(clip, world, 4, tmp_path)
    finally:
        clip.precision = kept
    assert len(list(tmp_path.glob("clip-val-*"))) == 2  # one cache per precision, never mixed
