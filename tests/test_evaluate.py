import numpy as np
import pytest
import torch

from unclip_lite import checkpoint as ckpt
from unclip_lite.data import rendered
from unclip_lite.judge import (attribute_accuracy, encode_labels, ensure_judge, HEADS, IGNORE, Judge, load_judge, readings,
                                TrainedJudge)
from unclip_lite.images import degrade
from unclip_lite.stats import frechet_distance
from unclip_lite.shapes import ShapesWorld, parse_caption


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shifted = a + np.array([2.0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    # N(0, I) vs N(0, 4I): (1 + 4 - 2*2) per dimension = 1
    b = rng.normal(size=(4000, 3)) * 2
    assert frechet_distance(rng.normal(size=(4000, 3)), b) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :2])


def test_labels_from_scenes_and_from_parsed_captions():
    world = ShapesWorld("val")
    attrs = [world.attributes(i) for i in range(50)]
    labels = encode_labels(attrs)
    assert (labels["shape"] != IGNORE).all()
    two = torch.tensor([a["count"] == 2 for a in attrs])
    assert ((labels["shape2"] != IGNORE) == two).all()
    parsed = encode_labels([parse_caption("big red circle")])
    assert parsed["colour"].item() == HEADS["colour"].index("red")
    assert parsed["background"].item() == IGNORE and torch.isnan(parsed["pos"]).all()


def test_degradations_keep_range_and_shape():
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    g = torch.Generator().manual_seed(0)
    y = degrade(x, blur=1.0, noise=0.1, down=True, generator=g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)


def test_judge_reads_any_resolution_and_uint8():
    model = Judge(width=8, feature_dim=16).eval()
    assert Judge.prepare(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 3, 32, 32)
    out = model(Judge.prepare(torch.rand(2, 3, 16, 16) * 2 - 1))
    assert out["shape"].shape == (2, len(HEADS["shape"])) and out["features"].shape == (2, 16)


def test_smoke_judge_trains_saves_and_reloads(tmp_path, smoke):
    judge = ensure_judge(tmp_path, smoke, progress=False)
    folder = tmp_path / "judge"
    assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()
    metrics = ckpt.read_json(folder / "metrics.json")
    assert set(metrics["accuracy"]) == {"test", "heldout"}
    assert set(metrics["accuracy"]["test"]) == {"clean", "blur", "noise", "16px", "all"}
    assert metrics["train"]["samples_per_s"] > 0
    data = rendered(ShapesWorld("val", smoke.world), 16)
    acc = judge.attribute_accuracy(data["images"], data["attributes"])
    assert set(acc) >= {"shape", "colour", "size", "background", "count", "joint"}
    assert all(0 <= v <= 1 for v in acc.values())
    # the reloaded judge gives the same answers
    again = ensure_judge(tmp_path, smoke, progress=False)
    assert torch.allclose(again.features(data["images"]), judge.features(data["images"]))
    preds = judge.predict(data["images"][:3])
    assert all(p["shape"] in HEADS["shape"] and p["count"] in (1, 2) for p in preds)
    phrases = readings(judge, data["images"][:3])  # the phrase is the prediction, object by object
    assert phrases == [" + ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in p["objects"]) for p in preds]
    assert all((" + " in ph) == (p["count"] == 2) for ph, p in zip(phrases, preds))
    # a different config: strict loading names the field; ensure_judge moves the old judge aside
    smoke.judge.width = 12
    with pytest.raises(ckpt.ConfigMismatchError, match=r"judge.width: 8 != 12"):
        load_judge(folder, smoke)
    new = ensure_judge(tmp_path, smoke, progress=False)
    assert new.model.trunk[0][0].out_channels == 12
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("judge.stale-")]
    assert len(stale) == 1 and load_judge(stale[0]).model.trunk[0][0].out_channels == 8


def test_retrain_discards_an_interrupted_runs_checkpoint(tmp_path, smoke):
    folder = tmp_path / "judge"
    folder.mkdir()
    ckpt.save_state(folder / "train_state.safetensors", {"step": 3, "config": {"other": 1}})
    with pytest.raises(ckpt.ConfigMismatchError, match="delete"):
        ensure_judge(tmp_path, smoke, progress=False)
    ensure_judge(tmp_path, smoke, retrain=True, progress=False)
    assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()


def test_judge_accepts_stacked_shapesworld_images():
    imgs = np.stack([ShapesWorld("val")[i].image for i in range(2)])
    assert Judge.prepare(imgs).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        Judge.prepare(imgs.astype(np.float32))


def test_attribute_accuracy_scores_only_named_attributes():
    class Fixed(TrainedJudge):  # a judge that always says "large red circle, one object, black"
        def outputs(self, images, batch_size=256):
            n = len(images)
            out = {h: torch.zeros(n, len(v)) for h, v in HEADS.items()}
            for h, v in (("shape", "circle"), ("colour", "red"), ("size", "large"), ("background", "black"), ("count", "1")):
                out[h][:, HEADS[h].index(v)] = 1
            return out
    judge = Fixed(Judge(width=8, feature_dim=16))
    images = torch.zeros(2, 3, 64, 64)
    acc = attribute_accuracy(images, [parse_caption("big red circle"), parse_caption("small red square")], judge)
    assert acc["colour"] == 1.0 and acc["shape"] == 0.5 and acc["size"] == 0.5 and acc["joint"] == 0.5
    assert "background" not in acc
    with pytest.raises(ValueError, match="2 images but 1"):
        attribute_accuracy(images, [parse_caption("red")], judge)


def test_attribute_hits_score_only_what_each_entry_names():
    from unclip_lite.judge import accuracy_from_hits, attribute_hits, HEADS

    class StubJudge:  # reads every image as a small red circle on black, one object
        def outputs(self, images):
            out = {h: torch.full((len(images), len(v)), -10.0) for h, v in HEADS.items()}
            for h, value in {"shape": "circle", "colour": "red", "size": "small", "background": "black", "count": "1"}.items():
                out[h][:, HEADS[h].index(value)] = 10.0
            return out

    wanted = [{"objects": [{"shape": "circle", "colour": "red"}]},  # right
              {"objects": [{"colour": "blue"}]},  # wrong colour
              {"objects": [{"shape": "circle"}], "background": "white"}]  # background wrong, not part of joint
    hits = attribute_hits(torch.zeros(3, 3, 32, 32), wanted, StubJudge())
    assert hits["joint"].tolist() == [True, False, True]
    acc = accuracy_from_hits(hits)
    assert acc["shape"] == 1.0 and acc["colour"] == 0.5 and acc["background"] == 0.0 and "size" not in acc


def test_proportion_ci_is_the_wilson_interval_and_stays_in_0_1():
    from unclip_lite.stats import proportion_ci
    rate, low, high = proportion_ci(0.5, 8)  # 4 of 8: Wilson gives [0.215, 0.785]
    assert rate == 0.5 and abs(low - 0.2152) < 1e-3 and abs(high - 0.7848) < 1e-3
    _, low, high = proportion_ci(1.0, 8)  # 8 of 8: the interval reaches 1 and stays under it
    assert high == 1.0 and low > 0.6
    assert proportion_ci(0.0, 32)[1] == 0.0 and 0 < proportion_ci(0.0, 32)[2] < 0.15
    assert np.isnan(proportion_ci(0.0, 0)[1])
