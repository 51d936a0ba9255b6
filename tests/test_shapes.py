import numpy as np
import pytest

from unclip_lite.config import WorldConfig
from unclip_lite.shapes import (BACKGROUNDS, COLOURS, SHAPES, SIZES, ShapesWorld, caption_matches, matches,
                                parse_caption, parse_composition)


def test_vocabulary_meets_the_spec():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(SIZES) == 3
    assert len(BACKGROUNDS) >= 4 and {"striped", "dotted"} <= set(BACKGROUNDS)


def test_same_seed_and_index_give_identical_bytes():
    a, b = ShapesWorld("train", WorldConfig(seed=3)), ShapesWorld("train", WorldConfig(seed=3))
    for i in (0, 17, 99_999):  # random access, nothing materialised
        sa, sb = a[i], b[i]
        assert sa.image.tobytes() == sb.image.tobytes()
        assert sa.caption == sb.caption and sa.attributes == sb.attributes
    assert a[5].image.tobytes() != a[6].image.tobytes()
    assert a[5].image.tobytes() != ShapesWorld("train", WorldConfig(seed=4))[5].image.tobytes()
    assert a[5].image.tobytes() != ShapesWorld("val", WorldConfig(seed=3))[5].image.tobytes()


def test_images_are_64px_rgb_and_antialiased():
    s = ShapesWorld("train")[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    # antialiasing leaves intermediate values along edges: more distinct colours than bg + object
    world = ShapesWorld("train")
    plain = next(world[i] for i in range(50) if world[i].attributes["background"] in ("black", "white"))
    assert len(np.unique(plain.image.reshape(-1, 3), axis=0)) > 4


def test_every_attribute_value_occurs_and_scenes_vary_continuously():
    world = ShapesWorld("train")
    attrs = [world.attributes(i) for i in range(600)]
    assert {a["shape"] for a in attrs} == set(SHAPES)
    assert {a["colour"] for a in attrs} == set(COLOURS)
    assert {a["size"] for a in attrs} == set(SIZES)
    assert {a["background"] for a in attrs} == set(BACKGROUNDS)
    assert {a["count"] for a in attrs} == {1, 2}
    xs = [a["objects"][0]["x"] for a in attrs]
    assert len(set(xs)) == len(xs) and min(xs) < 0.3 and max(xs) > 0.7


def test_two_object_scenes_put_object_zero_left_or_above():
    world = ShapesWorld("train", WorldConfig(p_two_objects=1.0))
    for i in range(200):
        a = world.attributes(i)
        o0, o1 = a["objects"]
        if a["relation"] == "left of":
            assert o0["x"] < 0.5 < o1["x"]
        else:
            assert o0["y"] < 0.5 < o1["y"]


def test_captions_name_the_true_attributes_in_paraphrases():
    world = ShapesWorld("val")
    captions = set()
    for i in range(2000):
        s = world[i]
        parsed = parse_caption(s.caption)
        assert caption_matches(parsed, s.attributes), (s.caption, s.attributes)
        assert parsed["objects"][0]["shape"] == s.attributes["objects"][0]["shape"]
        captions.add(s.caption)
    assert len(captions) > 1000  # paraphrases, not one template


def test_paraphrases_parse_to_the_same_canonical_attributes():
    a = parse_caption("a large red circle left of a small blue square")
    b = parse_caption("a tiny blue square right of a big red circle, dark background")
    assert a["objects"] == b["objects"] == [{"size": "large", "colour": "red", "shape": "circle"},
                                            {"size": "small", "colour": "blue", "shape": "square"}]
    assert b["background"] == "black" and a["relation"] == b["relation"] == "left of"
    assert parse_caption("big red circle") == {"count": 1, "objects": [{"size": "large", "colour": "red", "shape": "circle"}]}


def test_held_out_compositions_never_appear_in_train():
    cfg = WorldConfig(held_out=("green star", "large purple circle"), p_two_objects=0.5)
    comps = [parse_composition(t) for t in cfg.held_out]
    train = ShapesWorld("train", cfg)
    for i in range(5000):
        a = train.attributes(i)
        for obj in a["objects"]:
            assert not any(matches(obj, a["background"], c) for c in comps), (i, a)
    held = ShapesWorld("heldout", cfg)
    for i in range(300):
        a = held.attributes(i)
        assert any(matches(a["objects"][a["held_out_object"]], a["background"], c) for c in comps)
    # val shares train's distribution (no held-out compositions either)
    assert not any(matches(o, a["background"], c) for i in range(500)
                   for a in [ShapesWorld("val", cfg).attributes(i)] for o in a["objects"] for c in comps)


def test_held_out_compositions_may_name_a_background():
    cfg = WorldConfig(held_out=("green star striped", "red circle on dots"))
    comps = [parse_composition(t) for t in cfg.held_out]
    assert comps[1] == {"colour": "red", "shape": "circle", "background": "dotted"}
    for i in range(300):
        a = ShapesWorld("heldout", cfg).attributes(i)
        assert any(matches(a["objects"][a["held_out_object"]], a["background"], c) for c in comps)
        t = ShapesWorld("train", cfg).attributes(i)
        assert not any(matches(o, t["background"], c) for o in t["objects"] for c in comps)


def test_bad_configuration_is_reported_clearly():
    with pytest.raises(ValueError, match="unknown word 'gren'"):
        ShapesWorld("train", WorldConfig(held_out=("gren star",)))
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld("training")
    with pytest.raises(IndexError):
        ShapesWorld("val", WorldConfig(n_val=10))[10]
