"""The explorers, driven headless: set a widget's value, read the status and the images."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from unclip_lite import manipulate
from unclip_lite.widgets import GuidanceExplorer, InterpolationExplorer, TextDiffExplorer, to_png

STEPS = 3  # the smoke decoder: seconds per explorer


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_to_png_is_a_row_of_enlarged_images():
    images = torch.zeros(3, 3, 32, 32)
    images[1] = 1.0
    png = to_png(images, scale=2, gap=2)
    assert _png_size(png) == ((3 * 32 + 2 * 2) * 2, 64)
    arr = np.array(Image.open(io.BytesIO(png)))
    assert int(arr[0, 0, 0]) == 128 and int(arr[0, 2 * 34 + 1, 0]) == 255  # grey, then white (nearest, no blur)


def test_interpolation_slider_reruns_only_the_decoder(smoke_pipe):
    ex = InterpolationExplorer(smoke_pipe, "a red circle", "a blue star on a striped background", theta=0.5, steps=STEPS)
    assert ex.status.value.startswith("θ = 0.50 · x_T fixed") and ex.images.shape == (3, 3, 32, 32)
    assert ex.calls == {"prior": 2, "decode": 2}  # the endpoints once, then the image at θ
    first, png = ex.images.clone(), ex.image.value
    ex.theta.value = 0.8  # what the browser does
    assert ex.status.value.startswith("θ = 0.80") and ex.calls == {"prior": 2, "decode": 3}
    assert torch.equal(ex.images[[0, 2]], first[[0, 2]]) and not torch.equal(ex.images[1], first[1])
    assert ex.image.value != png
    # the image at θ is the decoder's output on slerp(z_a, z_b, θ) from A's x_T
    z, x_t = ex.latent(0.8, "fixed")
    assert torch.equal(x_t, ex.x_a) and torch.allclose(z, manipulate.slerp(ex.z_a, ex.z_b, 0.8))
    assert torch.equal(ex.images[1:2], manipulate.decode_latents(smoke_pipe, z, x_t, steps=STEPS))


def test_interpolation_inverted_mode_returns_to_the_endpoints(smoke_pipe):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    ex = InterpolationExplorer(smoke_pipe, a, b, theta=0.0, mode="inverted", steps=STEPS)
    assert ex.calls["invert"] == 2 and "prior" not in ex.calls
    # θ = 0 decodes A's own latents (alone, where A was decoded in a batch with B: bf16 rounding differs)
    assert (ex.images[1] - ex.images[0]).abs().max() < 0.02
    ex.theta.value = 1.0
    assert (ex.images[1] - ex.images[2]).abs().max() < 0.02 and ex.status.value.startswith("θ = 1.00 · x_T inverted")
    ex.mode.value = "fixed"  # B's z_i from A's x_T: another image
    assert (ex.images[1] - ex.images[2]).abs().max() > 0.1 and ex.calls["invert"] == 2


def test_upsample_box_switches_the_output_to_64px(smoke_pipe):
    ex = InterpolationExplorer(smoke_pipe, "a red circle", "a green square", steps=STEPS)
    ex.upsample.value = True
    assert ex.images.shape == (3, 3, 64, 64) and ex.calls["prior"] == 2


def test_text_diff_explorer_caches_the_inversion_and_the_direction(smoke_pipe):
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    ex = TextDiffExplorer(smoke_pipe, image, "a red circle", "a blue circle", steps=STEPS)
    assert ex.calls == {"invert": 1, "text": 1, "decode": 1} and ex.images.shape == (2, 3, 32, 32)
    at_zero = ex.images[1].clone()
    ex.theta.value = 0.5
    assert ex.status.value.startswith("θ = 0.50 · 'a red circle' → 'a blue circle'")
    assert ex.calls == {"invert": 1, "text": 1, "decode": 2} and not torch.equal(ex.images[1], at_zero)
    expected = manipulate.text_diff(smoke_pipe, ex.z, ex.x_t, "a red circle", "a blue circle", [0.5], steps=STEPS)
    assert torch.equal(ex.images[1:], expected)
    ex.to_caption.value = "a red star"  # a new direction: one more text encoding, no new inversion
    assert ex.calls == {"invert": 1, "text": 2, "decode": 3}


def test_bad_input_goes_to_the_status_and_keeps_the_last_image(smoke_pipe):
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    ex = TextDiffExplorer(smoke_pipe, image, "a red circle", "a blue circle", steps=STEPS)
    kept = ex.image.value
    ex.to_caption.value = "   "
    assert ex.status.value.startswith("error: caption 1 is empty") and ex.image.value == kept
    ex.to_caption.value = "a red circle"
    assert "same" in ex.status.value and ex.error is not None
    with pytest.raises(ValueError, match="mode must be"):
        InterpolationExplorer(smoke_pipe, "a red circle", "a blue star", mode="sideways", steps=STEPS)
    with pytest.raises(ValueError, match="one image of shape"):
        TextDiffExplorer(smoke_pipe, torch.zeros(2, 3, 8, 8), "a", "b", steps=STEPS)


def test_guidance_explorer_reuses_prior_samples(smoke_pipe):
    ex = GuidanceExplorer(smoke_pipe, "a big blue star", n=2, steps=STEPS)
    assert ex.images.shape == (2, 3, 32, 32) and ex.calls == {"prior": 1, "decode": 1}
    first = ex.images.clone()
    ex.decoder_guidance_scale.value = 6.0
    assert ex.calls == {"prior": 1, "decode": 2} and ex.status.value.startswith("decoder guidance 6.0")
    assert not torch.equal(first, ex.images)
    ex.decoder_guidance_scale.value = ex.decoder_guidance_scale.value  # no change, no work
    ex.seed.value = 5
    assert ex.calls == {"prior": 2, "decode": 3} and "seed 5" in ex.status.value
    ex.seed.value = 0  # back to a prior sample already drawn
    ex.decoder_guidance_scale.value = smoke_pipe.decoder.cfg.guidance_scale
    assert ex.calls["prior"] == 2 and torch.equal(ex.images, first)  # same settings, same images
    ex.prior.value = "ar"
    assert ex.calls["prior"] == 3 and ex.error is None and ex.prior_guidance_scale.disabled and "AR prior" in ex.status.value
    ex.prior_guidance_scale.value = 5.0  # the AR prior has no guidance: the cached sample is reused
    assert ex.calls["prior"] == 3


def test_text_diff_shows_the_source_at_the_output_size(smoke_pipe):
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    ex = TextDiffExplorer(smoke_pipe, image, "a red circle", "a blue circle", steps=STEPS)
    ex.upsample.value = True
    assert ex.images.shape == (2, 3, 64, 64)
    assert torch.allclose(ex.images[0], image.float() / 127.5 - 1)  # the 64 px source itself, not a 32 px round trip


def test_a_saved_explorer_shows_a_picture_of_its_state_not_the_widget_repr(smoke_pipe):
    """A notebook read without a kernel falls back from the widget to image/png, then text/plain:
    the explorer offers both, drawn from the state it is in."""
    import base64

    from unclip_lite.widgets import InterpolationExplorer, to_png

    a, b = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ex = InterpolationExplorer(smoke_pipe, a, b, theta=0.25, steps=STEPS, names=("a red circle", "a blue star"))
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # the live widget, for a kernel
    assert base64.b64decode(bundle["image/png"]) == to_png(ex.images, ex.scale)  # A, the image at θ, B
    assert "VBox" not in bundle["text/plain"] and "θ = 0.25" in bundle["text/plain"]
    assert "'a red circle'" in bundle["text/plain"] and "'a blue star'" in bundle["text/plain"]
    ex.theta.value = 0.75  # the picture follows the sliders
    assert base64.b64decode(ex._repr_mimebundle_()["image/png"]) == to_png(ex.images, ex.scale)
    with pytest.raises(ValueError, match="names must be two strings"):
        InterpolationExplorer(smoke_pipe, a, b, steps=STEPS, names=("only one",))
