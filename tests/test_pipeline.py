import dataclasses
import shutil

import pytest
import torch

from unclip_lite import manipulate
from unclip_lite.clip import ensure_clip
from unclip_lite.config import get_preset
from unclip_lite.pipeline import PipelineError, UnCLIP


@pytest.fixture
def artifacts(smoke_artifacts):
    return smoke_artifacts


@pytest.fixture
def pipe(smoke_pipe):
    return smoke_pipe


def test_generate_is_64px_and_the_same_for_the_same_seed(pipe):
    caps = ["a red circle", "a big blue star on a striped background", "a green square"]
    a = pipe.generate(caps, seed=3, steps=3, progress=False, batch_size=2)
    assert a.shape == (3, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, pipe.generate(caps, seed=3, steps=3, progress=False, batch_size=2))
    assert not torch.equal(a, pipe.generate(caps, seed=4, steps=3, progress=False, batch_size=2))
    assert torch.equal(a, pipe.generate(caps, seed=3, steps=3, progress=False, batch_size=1))  # batching: same images
    out = pipe.generate(caps[:1], prior="ar", steps=3, progress=False, upsample=False, return_intermediates=True)
    assert out["x32"].shape == (1, 3, 32, 32) and out["x64"] is None and out["z_i"].shape == (1, pipe.clip.embed_dim)


def test_bad_inputs_get_clear_errors(pipe):
    with pytest.raises(PipelineError, match="no captions"):
        pipe.generate([], progress=False)
    with pytest.raises(PipelineError, match="caption 1 is empty"):
        pipe.generate(["a red circle", "  "], progress=False)
    with pytest.raises(PipelineError, match="longer than CLIP's context of 24 tokens"):
        pipe.generate(["a red circle " * 12], progress=False)
    with pytest.raises(PipelineError, match="prior 'gan' is not loaded"):
        pipe.generate(["a red circle"], prior="gan", progress=False)


def test_missing_stage_and_mismatched_clip_are_named(artifacts, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(artifacts, partial, ignore=shutil.ignore_patterns("cache"))
    shutil.rmtree(partial / "upsampler")
    with pytest.raises(PipelineError, match=r"missing stage folder\(s\) \['upsampler'\]"):
        UnCLIP.from_artifacts(partial)
    assert UnCLIP.from_artifacts(partial, upsampler=False).upsampler is None
    # a CLIP retrained with another config: the decoder and priors no longer fit
    smoke = get_preset("smoke")
    other = ensure_clip(tmp_path / "other", dataclasses.replace(
        smoke, clip=dataclasses.replace(smoke.clip, p_partial_caption=0.0)), progress=False)
    shutil.rmtree(partial / "clip")
    shutil.copytree(other.folder, partial / "clip")
    with pytest.raises(PipelineError, match="decoder was trained against another CLIP"):
        UnCLIP.from_artifacts(partial, upsampler=False)


def test_manipulations_shapes_and_determinism(pipe):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    z, x_t = manipulate.invert(pipe, images, steps=3)
    assert z.shape == (2, pipe.clip.embed_dim) and x_t.shape == (2, 3, 32, 32)
    again = manipulate.decode_latents(pipe, z, x_t, steps=3)
    assert torch.equal(again, manipulate.decode_latents(pipe, z, x_t, steps=3))  # eta = 0: deterministic
    var = manipulate.variations(pipe, images[0], n=3, eta=1.0, steps=3, latents=(z[:1], x_t[:1]))
    assert var.shape == (3, 3, 32, 32) and not torch.equal(var[0], var[1])  # eta > 0: each its own noise
    path = manipulate.interpolate(pipe, z[0], z[1], [0.0, 0.5, 1.0], mode="inverted", x_t_a=x_t[0], x_t_b=x_t[1], steps=3)
    assert torch.allclose(path[0], again[0], atol=1e-5)  # theta = 0 is image a's own latents
    with pytest.raises(ValueError, match="needs both inverted latents"):
        manipulate.interpolate(pipe, z[0], z[1], [0.5], mode="inverted")
    edits = manipulate.text_diff(pipe, z[0], x_t[0], "a red circle", "a blue circle", [0.0, 0.3], steps=3, upsample=True)
    assert edits.shape == (2, 3, 64, 64)
    own = manipulate.decode_latents(pipe, z[:1], x_t[:1], steps=3, upsample=True)
    assert torch.allclose(edits[:1], own, atol=1e-5)  # theta = 0: the image's own latents


def test_one_decode_path_one_seed_convention(pipe):
    """The pipeline, the decoder's split helper, notebook 12's decode_z and the manipulations all
    decode through TrainedDecoder.decode: for one seed, the same x_T and the same images."""
    from unclip_lite.clip import no_caption
    from unclip_lite.decoder import decode_split
    from unclip_lite.runtime import stage_seed
    from unclip_lite.studies.claims import decode_z

    caps = ["a red circle", "a big blue star on a striped background", "a green square"]
    z = pipe.priors["diffusion"].sample(caps, seed=0)
    ours = pipe.decode(z, caps, steps=3, seed=5, upsample=False, progress=False)
    assert torch.equal(ours, decode_split(pipe.decoder, pipe.clip, {"captions": caps}, steps=3, seed=5, z=z))
    assert torch.equal(ours, decode_z(pipe, pipe.decoder, z, caps, steps=3, seed=5))
    x_t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(stage_seed(5, "decoder")))
    states, mask = no_caption(pipe.clip, 3)
    assert torch.equal(manipulate.decode_latents(pipe, z, x_t, steps=3, guidance_scale=pipe.decoder.cfg.guidance_scale),
                       pipe.decoder.decode(z, states, mask, seed=5, steps=3))  # no caption, the seed's x_T
