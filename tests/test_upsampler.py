import dataclasses
import math

import pytest
import torch

from unclip_lite import checkpoint as ckpt
from unclip_lite.images import resize_uint8
from unclip_lite.config import UpsamplerConfig
from unclip_lite.decoder import Decoder
from unclip_lite.unet import AttentionBlock, UNet
from unclip_lite.upsampler import bicubic_upsample, check_config, corrupt, ensure_upsampler, load_upsampler, upsample_condition, Upsampler, UpsamplerBatches
from unclip_lite.images import psnr

CFG = UpsamplerConfig(base_channels=16, channel_mults=(1, 2), crop_size=16)


def _model(**kw):
    torch.manual_seed(0)
    model = Upsampler(dataclasses.replace(CFG, **kw)).eval()
    for p in model.parameters():  # the zero-initialised outputs would hide every dependency
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def test_no_attention_anywhere_and_the_decoder_keeps_its_mid_attention():
    model = Upsampler(CFG)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    net = UNet(3, 3, 16, (1, 2), 1, attention_levels=(1,), context_dim=8)  # the default keeps it
    assert isinstance(net.mid[1], AttentionBlock) and "mid.1.qkv.weight" in net.state_dict()
    from unclip_lite.config import DecoderConfig
    keys = Decoder(DecoderConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), context_dim=32),
                   16, 24).state_dict()
    assert "unet.mid.1.qkv.weight" in keys and "unet.mid.2.conv1.weight" in keys


@torch.no_grad()
def test_runs_on_crops_and_full_images_and_every_input_reaches_the_output():
    model = _model()
    g = torch.Generator().manual_seed(0)
    for size in (16, 32, 64):  # fully convolutional: the crop size at training, the full image at sampling
        x, cond = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)
        assert model(x, torch.tensor([10.0, 900.0]), cond, torch.zeros(2)).shape == (2, 3, size, size)
    t, aug = torch.tensor([10.0, 900.0]), torch.tensor([0.0, 0.1])
    base = model(x, t, cond, aug)
    assert not torch.allclose(base, model(x, t, -cond, aug), atol=1e-4)  # the low-res image matters
    assert not torch.allclose(base, model(x, t, cond, aug + 0.2), atol=1e-4)  # the noise level matters
    assert not torch.allclose(base, model(x, t + 50, cond, aug), atol=1e-4)  # the timestep matters
    assert torch.equal(base, model(x, t, cond, aug))
    assert Upsampler(CFG)(x, t, cond, aug).abs().max() == 0  # untrained: zero output layer


def test_corruption_is_a_3x3_blur_with_sigma_0_6_plus_noise_of_the_given_level():
    cfg = UpsamplerConfig()
    assert (cfg.blur_kernel, cfg.blur_sigma) == (3, 0.6)
    x = torch.zeros(1, 3, 9, 9)
    x[..., 4, 4] = 1.0  # an impulse: the output is the kernel
    out = corrupt(x, torch.tensor([True]), torch.zeros(1), cfg)
    k1 = torch.tensor([math.exp(-1 / (2 * 0.36)), 1.0, math.exp(-1 / (2 * 0.36))])
    k1 = k1 / k1.sum()
    assert torch.allclose(out[0, 0, 3:6, 3:6], torch.outer(k1, k1), atol=1e-6)
    assert out[0, 0].count_nonzero() == 9  # kernel 3: nothing beyond one pixel
    assert torch.equal(corrupt(x, torch.tensor([False]), torch.zeros(1), cfg), x)  # not blurred
    noise = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    x2 = x.repeat(2, 1, 1, 1)
    noisy = corrupt(x2, torch.tensor([False, False]), torch.tensor([0.0, 0.25]), cfg, noise)
    assert torch.equal(noisy[0], x2[0]) and torch.allclose(noisy[1] - x2[1], 0.25 * noise[1])


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)


def test_batches_are_a_pure_function_of_the_step_and_crops_line_up(smoke):
    cfg = smoke.upsampler
    images = _images()
    batches = UpsamplerBatches(images, cfg, seed=0)
    a, b = batches(3), batches(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_start"], batches(4)["x_start"])
    c, n = cfg.crop_size, cfg.train.batch_size
    assert a["x_start"].shape == a["cond"].shape == (n, 3, c, c) and a["x_start"].abs().max() <= 2 * cfg.residual_scale
    assert a["aug"].min() >= 0 and a["aug"].max() <= cfg.aug_max
    # the crop of x_start is the same window as the crop of the condition: rebuild one from scratch
    plain = dataclasses.replace(cfg, p_blur=0.0, p_aug=0.0, residual_scale=None)
    clean = UpsamplerBatches(images, plain, seed=0)(3)
    assert not clean["blur"].any() and not clean["aug"].any()
    residual = UpsamplerBatches(images, dataclasses.replace(plain, residual_scale=5.0), seed=0)(3)
    assert torch.allclose(residual["x_start"], (clean["x_start"] - clean["cond"]) * 5.0, atol=1e-5)
    g = torch.Generator().manual_seed(3)  # same index draw as the batch
    idx = torch.randint(len(images), (n,), generator=g)
    full32 = resize_uint8(images[idx], 32).float().div(127.5).sub(1)
    full_cond = bicubic_upsample(full32)
    for i in range(n):
        y, x = int(clean["top"][i]), int(clean["left"][i])
        assert y % 2 == 0 and x % 2 == 0 and 0 <= y <= 64 - c and 0 <= x <= 64 - c
        assert torch.allclose(clean["cond"][i], full_cond[i, :, y:y + c, x:x + c], atol=1e-5)
        assert torch.allclose(clean["x_start"][i], images[idx[i], :, y:y + c, x:x + c].float().div(127.5).sub(1))


def test_config_checks_and_helpers():
    with pytest.raises(ValueError, match="crop_size 24 must be a multiple of 16"):
        check_config(dataclasses.replace(UpsamplerConfig(), crop_size=24))
    with pytest.raises(ValueError, match="unknown upsampling mode"):
        check_config(dataclasses.replace(UpsamplerConfig(), cond_upsample="lanczos"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(upsample_condition(x, "nearest")[:, :, ::2, ::2], x)
    assert bicubic_upsample(x).shape == (2, 3, 64, 64) and bicubic_upsample(x).abs().max() <= 1
    assert psnr(x, -x).shape == (2,)  # one value per image
    assert (psnr(x, x) > 90).all() and (psnr(x, x + 0.02) - 10 * math.log10(4 / 0.02 ** 2)).abs().max() < 1e-3


def test_smoke_upsampler_trains_samples_and_reloads(tmp_path, smoke):
    trained = ensure_upsampler(tmp_path, smoke, progress=False)
    folder = tmp_path / "upsampler"
    assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()
    val = trained.metrics["val"]
    assert {"psnr_upsampler", "psnr_bicubic"} <= set(val["clean"]) and val["clean"]["psnr_bicubic"] > 15
    assert trained.metrics["train"]["samples_per_s"] > 0
    x32 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = trained.upsample(x32, seed=1)
    assert a.shape == (3, 3, 64, 64) and a.abs().max() <= 1
    assert torch.equal(a, trained.upsample(x32, seed=1))  # deterministic per seed
    assert not torch.equal(a, trained.upsample(x32, seed=2))
    assert torch.allclose(a, trained.upsample(x32, seed=1, batch_size=2), atol=2e-2)  # noise is drawn per image
    assert not torch.equal(a, trained.upsample(x32, seed=1, aug_level=0.2))
    with pytest.raises(ValueError, match="expects"):
        trained.upsample(torch.zeros(1, 3, 64, 64))
    reloaded = ensure_upsampler(tmp_path, smoke, progress=False)  # loads, does not retrain
    assert reloaded.metrics["created"] == trained.metrics["created"]
    assert torch.equal(reloaded.upsample(x32, seed=1), a)
    other = dataclasses.replace(smoke, upsampler=dataclasses.replace(smoke.upsampler, p_blur=0.0))
    with pytest.raises(ckpt.ConfigMismatchError, match="upsampler.p_blur"):
        load_upsampler(folder, other)
