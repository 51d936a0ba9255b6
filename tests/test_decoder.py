import dataclasses

import pytest
import torch

from unclip_lite import checkpoint as ckpt
from unclip_lite.clip import ensure_clip
from unclip_lite.config import DecoderConfig
from unclip_lite.clip import caption_states
from unclip_lite.decoder import Decoder, DecoderBatches, ensure_decoder, load_decoder
from unclip_lite.judge import ensure_judge
from unclip_lite.unet import UNet

CFG = DecoderConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), context_dim=32)


def _inputs(b=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, 4:] = False
    return (torch.randn(b, 3, 32, 32, generator=g), torch.rand(b, generator=g) * 999, torch.randn(b, 16, generator=g),
            torch.randn(b, length, 24, generator=g), mask)


def _model(**kw):
    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(CFG, **kw), z_dim=16, text_width=24).eval()
    for p in model.parameters():  # the zero-initialised outputs would hide every dependency
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def test_unet_shapes_and_identity_at_init():
    net = UNet(in_channels=6, out_channels=3, base_channels=16, channel_mults=(1, 2, 2), attention_levels=(2,),
               context_dim=8)
    x = torch.randn(2, 6, 32, 32)
    out = net(x, torch.tensor([0.0, 500.0]), context=torch.randn(2, 5, 8), context_mask=torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() == 0  # zero-initialised output layer


@torch.no_grad()
def test_conditioning_reaches_the_output_and_the_nulls_cut_it():
    model = _model()
    x, t, z, states, mask = _inputs()
    base = model(x, t, z, states, mask)
    assert not torch.allclose(base, model(x, t, -z, states, mask), atol=1e-4)  # z_i matters
    other = states + torch.randn(states.shape, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(base, model(x, t, z, other, mask), atol=1e-4)  # the caption matters
    drop = torch.ones(3, dtype=torch.bool)
    no_z = model(x, t, z, states, mask, drop_z=drop)
    assert torch.allclose(no_z, model(x, t, -z, states, mask, drop_z=drop))  # dropped: z is ignored
    no_text = model(x, t, z, states, mask, drop_text=drop)
    assert torch.allclose(no_text, model(x, t, z, other, mask, drop_text=drop))
    padded = states.clone()
    padded[:, 4:] = 100.0  # padding tokens are masked out
    assert torch.allclose(base, model(x, t, z, padded, mask), atol=1e-5)


@torch.no_grad()
def test_caption_only_is_the_same_code_without_z():
    model = _model(caption_only=True)
    assert not hasattr(model, "z_emb") and not hasattr(model, "z_tokens")
    x, t, z, states, mask = _inputs()
    assert torch.allclose(model(x, t, z, states, mask), model(x, t, torch.zeros_like(z), states, mask))
    assert type(model) is Decoder
    # GLIDE-style: the caption's last real token also feeds the timestep embedding
    base = model(x, t, z, states, mask)
    last = states.clone()
    last[:, 3] = torch.randn(3, 24, generator=torch.Generator().manual_seed(3))  # token 3: the last unmasked one
    assert not torch.allclose(base, model(x, t, z, last, mask), atol=1e-4)
    drop = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(model(x, t, z, states, mask, drop_text=drop), model(x, t, z, last, mask, drop_text=drop))


def test_smoke_decoder_trains_samples_inverts_and_reloads(tmp_path, smoke):
    clip = ensure_clip(tmp_path, smoke, progress=False)
    judge = ensure_judge(tmp_path, smoke, progress=False)
    trained = ensure_decoder(tmp_path, smoke, clip, judge, progress=False)  # measures itself with the judge
    assert {"reconstruction", "strict", "samplers"} <= set(trained.metrics), list(trained.metrics)
    folder = tmp_path / "decoder"
    assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()
    states, mask = caption_states(clip, ["a red circle", "a big blue star on stripes"], trained.text_length)
    z = clip.encode_texts(["x", "y"])  # any unit vectors
    g = torch.Generator().manual_seed(0)
    images = trained.sample(z, states, mask, steps=4, generator=g)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    again = trained.sample(z, states, mask, steps=4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    det = [trained.sample(z, states, mask, steps=4, noise=noise, eta=0.0) for _ in range(2)]
    assert torch.equal(det[0], det[1]) and not torch.equal(images, again)
    x_t = trained.invert(images, z, states, mask, steps=4)
    assert x_t.shape == images.shape and torch.isfinite(x_t).all()
    reloaded = ensure_decoder(tmp_path, smoke, clip, progress=False)  # loads, does not retrain
    assert reloaded.metrics["created"] == trained.metrics["created"]
    assert torch.equal(reloaded.sample(z, states, mask, steps=4, noise=noise), det[0])
    # a decoder is tied to the CLIP it was trained on
    other = dataclasses.replace(smoke, clip=dataclasses.replace(smoke.clip, p_partial_caption=0.0))
    clip2 = ensure_clip(tmp_path / "other", other, progress=False)
    with pytest.raises(ckpt.ConfigMismatchError, match="clip_fingerprint"):
        load_decoder(folder, smoke, clip2)


def test_batches_are_a_pure_function_of_the_step(smoke):
    cache = {"image_embed": torch.randn(20, 16), "caption_index": torch.arange(20) % 5,
             "text_states": torch.randn(5, 6, 24).to(torch.bfloat16), "text_mask": torch.ones(5, 6, dtype=torch.bool)}
    images = torch.randint(0, 255, (20, 3, 64, 64), dtype=torch.uint8)
    batches = DecoderBatches(images, cache, smoke.decoder, seed=0)
    a, b = batches(3), batches(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x_start"].shape == (8, 3, 32, 32) and a["x_start"].min() >= -1 and a["x_start"].max() <= 1
    with pytest.raises(ValueError, match="cached embeddings"):
        DecoderBatches(images[:10], cache, smoke.decoder, seed=0)


def test_z_standardisation_uses_the_training_statistics():
    model = Decoder(dataclasses.replace(CFG, z_norm="standard"), z_dim=16, text_width=24)
    z = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.5
    model.set_z_stats(z)
    assert torch.allclose(model.z_mean, z.mean(0)) and torch.allclose(model.z_std, z.std(0))
    assert {"z_mean", "z_std"} <= set(model.state_dict())  # stored with the weights
    plain = Decoder(dataclasses.replace(CFG, z_norm="none"), z_dim=16, text_width=24)
    plain.set_z_stats(z)
    assert torch.equal(plain.z_mean, torch.zeros(16)) and torch.equal(plain.z_std, torch.ones(16))
    with pytest.raises(ValueError, match="unknown z_norm 'whiten'"):
        Decoder(dataclasses.replace(CFG, z_norm="whiten"), z_dim=16, text_width=24).set_z_stats(z)


def test_sampler_comparison_covers_ddim_and_the_two_longest_ddpm_runs():
    from unclip_lite.decoder import samplers_for
    labels = [label for label, _, _ in samplers_for(dataclasses.replace(CFG, compare_steps=(50, 10, 250, 25)))]
    assert labels == ["DDIM 10", "DDIM 25", "DDIM 50", "DDIM 250", "DDPM 50", "DDPM 250"]


def test_the_baseline_drops_its_caption_as_often_as_unclip_drops_z():
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    cache = {"image_embed": torch.randn(8, 16), "caption_index": torch.arange(8), "text_states": torch.randn(8, 6, 24),
             "text_mask": torch.ones(8, 6, dtype=torch.bool)}
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, batch_size=4000))
    draws = {flag: DecoderBatches(images, cache, dataclasses.replace(cfg, caption_only=flag), seed=0)(0)["drop_text"]
             for flag in (False, True)}
    assert abs(float(draws[False].float().mean()) - cfg.p_drop_text) < 0.03
    assert abs(float(draws[True].float().mean()) - cfg.p_drop_z) < 0.03


def test_the_reference_decoder_is_offered_only_next_to_its_own_clip(tmp_path, smoke):
    from unclip_lite.decoder import REFERENCE_DIR, load_reference_decoder
    assert ckpt.stage_exists(REFERENCE_DIR) and (REFERENCE_DIR / "made_by.json").exists()
    clip = ensure_clip(tmp_path, smoke, progress=False)  # a smoke CLIP: not the one it was trained against
    decoder, why = load_reference_decoder(clip)
    assert decoder is None and "trained against CLIP" in why
    trained = ensure_decoder(tmp_path, smoke, clip, progress=False)
    ours, why = load_reference_decoder(clip, tmp_path / "decoder")  # a decoder next to its own CLIP is offered
    assert why == "" and ours.cfg == trained.cfg
    assert load_reference_decoder(clip, tmp_path / "nothing")[0] is None


def test_reconstruction_report_reads_with_both_readers(tmp_path, smoke):
    from unclip_lite.decoder import reconstruction_report
    clip = ensure_clip(tmp_path, smoke, progress=False)
    judge = ensure_judge(tmp_path, smoke, progress=False)
    trained = ensure_decoder(tmp_path, smoke, clip, progress=False)
    out = reconstruction_report(trained, clip, judge, smoke, 6, tmp_path / "cache")
    for split in ("val", "heldout"):
        assert set(out["strict"][split]) == {"decoded", "real"}
        assert out["strict"][split]["real"]["shape"] == 1.0  # the strict reader on real scenes
        assert 0.0 <= out["reconstruction"][split]["shape"] <= 1.0
