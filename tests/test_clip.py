import dataclasses
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from unclip_lite import checkpoint as ckpt
from unclip_lite.clip_model import ClipModel, encode_text_with_states, load_clip, OUR_MODELS, register_models
from unclip_lite.clip import ClipBatches, embedding_cache, ensure_clip, load_clip_stage, modality_gap, MultiPositiveClipLoss, prompts_for, retrieval, zero_shot
from unclip_lite.stats import linear_probe
from unclip_lite.data import rendered
from unclip_lite.shapes import (BACKGROUNDS, COLOURS, PROMPT_ATTRIBUTES, SHAPES, SIZES, ShapesWorld,
                                caption_codes, caption_matches, match_matrix, parse_caption, partial_caption,
                                scene_codes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke-preset CLIP, trained once for the module (seconds; it means nothing)."""
    from unclip_lite.config import get_preset
    preset = get_preset("smoke")
    artifacts = tmp_path_factory.mktemp("artifacts")
    return preset, artifacts, ensure_clip(artifacts, preset, progress=False)


# --- the world side: partial captions and vectorised matching ------------------------------------

def test_partial_captions_name_only_what_they_say():
    world = ShapesWorld("val")
    scene = next(a for a in map(world.attributes, range(100)) if a["count"] == 1)
    for named in (("colour",), ("shape",), ("size", "background"), PROMPT_ATTRIBUTES):
        text = partial_caption(scene, named, np.random.default_rng(0))
        parsed = parse_caption(text)
        said = set(parsed["objects"][0]) | ({"background"} if "background" in parsed else set())
        assert said == set(named), text
        assert caption_matches(parsed, scene)
    assert partial_caption(scene, ("colour",)) == f"a {scene['colour']} shape"
    with pytest.raises(ValueError, match="subset"):
        partial_caption(scene, ("position",))


def test_match_matrix_equals_caption_matches():
    world = ShapesWorld("val")
    samples = [world[i] for i in range(150)]
    rng = np.random.default_rng(0)
    captions = [s.caption for s in samples]
    captions += [partial_caption(s.attributes, [a for a in PROMPT_ATTRIBUTES if rng.random() < 0.5] or ["shape"], rng)
                 for s in samples if s.attributes["count"] == 1][:60]
    attrs = [s.attributes for s in samples]
    fast = match_matrix(caption_codes(captions), scene_codes(attrs))
    slow = np.array([[caption_matches(parse_caption(c), a) for a in attrs] for c in captions])
    assert (fast == slow).all()
    assert fast[np.arange(150), np.arange(150)].all()  # every caption describes its own scene


# --- open_clip integration -------------------------------------------------------------------------

def test_our_configs_are_open_clip_models():
    register_models()
    assert "shapes-rn-64" in OUR_MODELS
    for name in OUR_MODELS:
        assert name in open_clip.list_models()
        model = open_clip.create_model(name)
        cfg = open_clip.get_model_config(name)
        assert 64 <= cfg["embed_dim"] <= 128 and cfg["vision_cfg"]["image_size"] in (32, 64)
        size = cfg["vision_cfg"]["image_size"]
        with torch.no_grad():
            assert model.encode_image(torch.zeros(2, 3, size, size)).shape == (2, cfg["embed_dim"])


def test_token_states_pool_to_open_clips_text_embedding():
    clip = load_clip("shapes-rn-64", precision="fp32")
    texts = ["a red circle", "a big blue star left of a tiny green ring on stripes"]
    tokens = clip.tokenize(texts)
    with torch.no_grad():
        pooled, states = encode_text_with_states(clip.model, tokens)
        reference = clip.model.encode_text(tokens)
    assert torch.allclose(pooled, reference, atol=1e-5)
    out = clip.text_states(texts)
    assert out["states"].shape == (2, clip.context_length, clip.width)
    assert out["mask"].sum(1).tolist() == [int(t.argmax()) + 1 for t in tokens]  # start .. end token
    assert torch.allclose(out["embedding"], F.normalize(reference, dim=-1), atol=1e-5)


def test_multi_positive_loss_reduces_to_open_clips_loss():
    g = torch.Generator().manual_seed(0)
    zi = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    zt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = MultiPositiveClipLoss()(zi, zt, scale, torch.eye(8, dtype=torch.bool))
    assert torch.allclose(ours, open_clip.ClipLoss()(zi, zt, scale))
    # with several positives, each row's target spreads evenly over them (written out by hand)
    pos = torch.rand(8, 8, generator=g) < 0.3
    pos |= torch.eye(8, dtype=torch.bool)
    logits = scale * zt @ zi.T  # (captions, images)
    by_caption = -(logits.log_softmax(1) * pos).sum(1) / pos.sum(1)
    by_image = -(logits.T.log_softmax(1) * pos.T).sum(1) / pos.T.sum(1)
    expected = (by_caption.mean() + by_image.mean()) / 2
    assert torch.allclose(MultiPositiveClipLoss()(zi, zt, scale, pos), expected, atol=1e-6)


def test_images_are_accepted_in_every_course_format():
    clip = load_clip("shapes-rn-64", precision="fp32")
    s = ShapesWorld("val")[0]
    as_uint8 = torch.from_numpy(s.image).permute(2, 0, 1)[None]
    as_float = as_uint8.float() / 127.5 - 1
    a = clip.encode_images(as_uint8)
    assert torch.allclose(a, clip.encode_images(as_float), atol=1e-5)
    assert torch.allclose(a, clip.encode_images(s.image[None]), atol=1e-5)
    small = F.interpolate(as_float, size=32, mode="bilinear", antialias=True)
    assert clip.encode_images(small).shape == a.shape  # resized to the model's input
    with pytest.raises(ValueError, match="uint8"):
        clip.encode_images(s.image[None].astype(np.float32))


def test_batches_are_deterministic_and_positives_are_exact(smoke):
    clip = load_clip("shapes-rn-64", precision="fp32")
    data = rendered(ShapesWorld("train", smoke.world), 300)
    batches = ClipBatches(clip, data, batch_size=64, p_partial=0.5, seed=0)
    a, b = batches(7), batches(7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert a["positives"].diagonal().all()
    idx, captions, _ = batches.sample(7)
    assert torch.equal(a["text"], clip.tokenize(captions))
    assert sum(c != data["captions"][i] for c, i in zip(captions, idx.tolist())) > 0  # some partial captions
    slow = torch.tensor([[caption_matches(parse_caption(c), data["attributes"][j]) for j in idx.tolist()]
                         for c in captions])
    assert torch.equal(a["positives"], slow)


def test_folder_datasets_match_identical_captions_only():
    data = {"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "captions": ["a cat", "a dog", "a cat", "x"],
            "attributes": [{}, {}, {}, {}]}
    clip = load_clip("shapes-rn-64", precision="fp32")
    batch = ClipBatches(clip, data, batch_size=16, p_partial=0.5, seed=0)(0)
    _, caps, _ = ClipBatches(clip, data, batch_size=16, p_partial=0.5, seed=0).sample(0)
    expect = torch.tensor([[ci == cj for cj in caps] for ci in caps])
    assert torch.equal(batch["positives"], expect)


# --- metrics on hand-made embeddings ---------------------------------------------------------------

def _oracle_embedding(attrs: dict) -> torch.Tensor:
    """An 'ideal CLIP' embedding of a (partial) attribute dict: one-hot blocks, zeros where unnamed."""
    obj = attrs["objects"][0] if attrs.get("objects") else {}
    parts = [F.one_hot(torch.tensor(vocab.index(obj[k])), len(vocab)).float() if k in obj else torch.zeros(len(vocab))
             for k, vocab in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", tuple(SIZES)))]
    bg = attrs.get("background")
    parts.append(F.one_hot(torch.tensor(BACKGROUNDS.index(bg)), 4).float() if bg else torch.zeros(4))
    return F.normalize(torch.cat(parts), dim=0)


class _OracleClip:
    def encode_texts(self, texts):
        return torch.stack([_oracle_embedding(parse_caption(t)) for t in texts])


def test_zero_shot_and_retrieval_are_perfect_for_an_ideal_embedding():
    world = ShapesWorld("val")
    data = rendered(world, 200)
    one = [i for i, a in enumerate(data["attributes"]) if a["count"] == 1]
    data = {"images": data["images"][one], "captions": [data["captions"][i] for i in one],
            "attributes": [data["attributes"][i] for i in one]}
    zi = torch.stack([_oracle_embedding(a) for a in data["attributes"]])
    zt = _OracleClip().encode_texts(data["captions"])
    acc = zero_shot(_OracleClip(), zi, data["attributes"])
    assert all(acc[a] == 1.0 for a in PROMPT_ATTRIBUTES)
    r = retrieval(zi, zt, data)
    assert r["caption_to_image_top1"] == 1.0 and r["image_to_caption_top1"] == 1.0
    # a random embedding scores near chance
    rand = F.normalize(torch.randn_like(zi), dim=-1)
    assert zero_shot(_OracleClip(), rand[:, :zi.shape[1]], data["attributes"])["shape"] < 0.5


def test_prompts_cover_every_class_and_synonym():
    sizes = prompts_for("size")
    assert set(sizes) == set(SIZES) and "a huge shape" in sizes["large"]
    assert prompts_for("background")["dotted"] == ["a shape on a dotted background",
                                                  "a shape on a polka-dot background"]


def test_modality_gap_and_linear_probe_on_known_cases():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(500, 8, generator=g), dim=-1)
    same = modality_gap(z, z)
    assert same["gap"] == pytest.approx(0, abs=1e-6) and same["cos_paired"] == pytest.approx(1)
    shifted = F.normalize(z + 3 * F.one_hot(torch.tensor(0), 8), dim=-1)
    assert modality_gap(z, shifted)["gap"] > 0.5
    x = torch.randn(600, 10, generator=g)
    assert linear_probe(x, x[:, 0] * 2 + 1) > 0.99  # a linear target is fully readable
    assert linear_probe(x, torch.randn(600, generator=g)) < 0.05  # noise is not
    labels = ["a" if v > 0 else "b" for v in x[:, 3].tolist()]
    assert linear_probe(x, labels) > 0.95


# --- training, the artifact, pretrained loading, the cache -------------------------------------------

def test_smoke_clip_trains_and_writes_a_self_describing_artifact(trained):
    preset, artifacts, clip = trained
    folder = artifacts / "clip"
    assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()
    m = ckpt.read_json(folder / "metrics.json")
    assert m["train"]["steps"] == preset.clip.train.steps and m["train"]["samples_per_s"] > 0
    for split in ("val", "heldout"):
        assert set(m["eval"][split]) == {"zero_shot", "retrieval", "modality_gap"}
        assert 0 <= m["eval"][split]["retrieval"]["caption_to_image_top1"] <= 1
    assert ckpt.read_json(folder / "config.json")["open_clip_model"] == preset.clip.model
    again = ensure_clip(artifacts, preset, progress=False)  # loads, does not retrain
    assert again.metrics["created"] == m["created"]


def test_the_fingerprint_is_of_the_weights_in_memory(trained, tmp_path):
    """A kernel that still holds an old CLIP keeps the old fingerprint when another process
    writes new weights into the folder; a change in memory changes it; a fresh load of a stage
    has the fingerprint of the file it read."""
    preset, artifacts, clip = trained
    folder = tmp_path / "clip"
    shutil.copytree(artifacts / "clip", folder)
    held = load_clip_stage(folder)
    assert held.fingerprint() == ckpt.fingerprint(folder) == clip.fingerprint()
    other = {k: v + 1e-3 if v.is_floating_point() else v for k, v in clip.model.state_dict().items()}
    ckpt.save_tensors(folder / ckpt.WEIGHTS, other)  # "another kernel retrained CLIP"
    assert ckpt.fingerprint(folder) != held.fingerprint() == clip.fingerprint()
    with torch.no_grad():
        next(held.model.parameters()).add_(1.0)
    assert held.fingerprint() != clip.fingerprint()


def test_our_checkpoint_loads_through_open_clips_pretrained_path(trained):
    preset, artifacts, clip = trained
    weights = artifacts / "clip" / "model.safetensors"
    texts = ["a red circle", "a star on a dotted background"]
    images = rendered(ShapesWorld("val", preset.world), 4)["images"]
    # plain open_clip, no unclip_lite wrapper: create_model(name, pretrained=<local file>)
    register_models()
    model = open_clip.create_model(preset.clip.model, pretrained=str(weights)).eval()
    with torch.no_grad():
        t_ref = F.normalize(model.encode_text(open_clip.get_tokenizer(preset.clip.model)(texts)), dim=-1)
    fp32 = load_clip(preset.clip.model, pretrained=str(weights), precision="fp32")
    assert torch.allclose(fp32.encode_texts(texts), t_ref, atol=1e-5)
    assert torch.allclose(fp32.encode_images(images), clip.encode_images(images), atol=0.05)  # bf16 vs fp32
    reloaded = load_clip_stage(artifacts / "clip", preset)
    assert torch.equal(reloaded.encode_images(images), clip.encode_images(images))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip(preset.clip.model, pretrained=str(artifacts / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("no-such-model")


def test_a_changed_config_moves_the_old_clip_aside(trained, tmp_path):
    preset, artifacts, _ = trained
    import shutil
    shutil.copytree(artifacts / "clip", tmp_path / "clip")
    changed = dataclasses.replace(preset, clip=dataclasses.replace(preset.clip, p_partial_caption=0.0))
    with pytest.raises(ckpt.ConfigMismatchError, match="p_partial_caption"):
        load_clip_stage(tmp_path / "clip", changed)
    ensure_clip(tmp_path, changed, progress=False)
    assert len(list(tmp_path.glob("clip.stale-*"))) == 1 and ckpt.stage_exists(tmp_path / "clip")


def test_embedding_cache_is_computed_once_and_feeds_a_later_stage(trained, monkeypatch):
    """Plays the part of the prior and decoder: read the cache, build their batches, train on it."""
    preset, artifacts, clip = trained
    world = ShapesWorld("train", preset.world)
    cache = embedding_cache(clip, world, 256, artifacts / "cache")
    n = 256
    assert cache["image_embed"].shape == (n, clip.embed_dim) and cache["text_embed"].shape == (n, clip.embed_dim)
    assert torch.allclose(cache["image_embed"].norm(dim=1), torch.ones(n), atol=1e-4)
    # stored once per distinct caption, and equal to computing them fresh
    unique = sorted(set(cache["captions"]))
    assert cache["text_states"].shape[0] == len(unique) and cache["text_states"].dtype == torch.bfloat16
    fresh = clip.text_states([cache["captions"][5]])
    row = cache["caption_index"][5]
    length = cache["text_mask"].shape[1]
    assert torch.equal(cache["text_mask"][row], fresh["mask"][0, :length])
    assert torch.allclose(cache["text_states"][row].float(), fresh["states"][0, :length], atol=0.05)
    assert not fresh["mask"][0, length:].any()  # trimming dropped only padding
    # a second call reads the stored artifact and computes nothing
    monkeypatch.setattr(ClipModel, "encode_images", lambda *a, **k: pytest.fail("recomputed image embeddings"))
    again = embedding_cache(clip, world, 256, artifacts / "cache")
    assert torch.equal(again["image_embed"], cache["image_embed"]) and again["captions"] == cache["captions"]
    monkeypatch.undo()
    # the later stage: cross-attention over token states with the padding masked, predicting z_i
    torch.manual_seed(0)
    attend = torch.nn.MultiheadAttention(clip.width, 4, batch_first=True)
    head = torch.nn.Linear(clip.width, clip.embed_dim)
    opt = torch.optim.Adam([*attend.parameters(), *head.parameters()], 3e-3)
    states = cache["text_states"][cache["caption_index"]].float()
    pad = ~cache["text_mask"][cache["caption_index"]]
    query = states.mean(1, keepdim=True)

    def loss():
        out, _ = attend(query, states, states, key_padding_mask=pad)
        return F.mse_loss(head(out[:, 0]), cache["image_embed"])
    first = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < first
    # another CLIP (different weights) gets its own cache entry, never stale embeddings
    other = load_clip(preset.clip.model)
    assert not torch.equal(embedding_cache(other, world, 256, artifacts / "cache")["image_embed"], cache["image_embed"])
