"""ipywidgets explorers for the manipulations of `manipulate.py` (notebooks 09 and 11).

Each explorer is a plain object with a `widget` (what the notebook displays), an `image` output, a
`status` label and an `update()` method that does the work; the sliders only call `update()`.
So a test can drive an explorer without a browser: set `explorer.theta.value = 0.3` and read
`explorer.status.value` and `explorer.images`.

What a slider move does not change is computed once and kept: image embeddings with their DDIM
inversions, prior samples and text-diff directions. A move re-runs only the decoder (and the
upsampler, when ticked; the guidance explorer also re-encodes its caption's tokens, a
millisecond). `explorer.calls` counts the expensive calls, so the caching is testable.

    from unclip_lite.widgets import InterpolationExplorer
    InterpolationExplorer(pipe, "a red circle", "a blue star")   # alone at the end of a notebook cell

Displayed, an explorer offers the live widget and, beside it, a PNG of its current strip and its
status as text: JupyterLab shows the widget, while a saved notebook read without a kernel
(GitHub, nbviewer, `jupyter nbconvert`) shows the picture of the state it was left in, not
`VBox(children=...)`.
"""
from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter

import ipywidgets as W
import numpy as np
import torch
from PIL import Image

from . import manipulate
from .images import IMAGE_SIZE, to_model_images
from .pipeline import PipelineError, check_sampling
from .runtime import check_arg, check_seed, stage_seed

__all__ = ["InterpolationExplorer", "TextDiffExplorer", "GuidanceExplorer", "to_png"]


def to_png(images: torch.Tensor, scale: int = 4, gap: int = 2) -> bytes:
    """A row of images (N, 3, H, W) in [-1, 1] as PNG bytes, each enlarged `scale`x (nearest)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = x.shape
    canvas = np.full((h, n * w + (n - 1) * gap, 3), 255, np.uint8)
    for i, im in enumerate(x):
        canvas[:, i * (w + gap): i * (w + gap) + w] = im
    pil = Image.fromarray(canvas)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="png")
    return buf.getvalue()


def _slider(description: str, value: float, lo: float, hi: float, step: float, css: str) -> W.FloatSlider:
    s = W.FloatSlider(value=value, min=lo, max=hi, step=step, description=description, continuous_update=False,
                      readout_format=".2f", style={"description_width": "initial"})
    s.add_class(css)
    return s


class Explorer:
    """The shared frame: image, status label, upsample box; `update()` re-renders.

    Subclasses implement `render() -> images (N, 3, H, W)` and `describe() -> str` (the status).
    An error in `render` (for example an empty caption) goes to the status label; the last good
    image stays on screen.
    """

    name = "explorer"

    def __init__(self, pipe, steps: int | None = None, upsample: bool = False, scale: int = 4):
        check_arg("steps", steps, minimum=1, integer=True)
        check_arg("scale", scale, minimum=1, integer=True, none_ok=False)
        self.pipe, self.steps, self.scale = pipe, steps, scale
        self.calls: Counter = Counter()
        self.images: torch.Tensor | None = None
        self.seconds: float | None = None
        self.error: str | None = None
        self.image = W.Image(format="png")
        self.image.add_class(f"unclip-{self.name}-image")
        self.status = W.Label(value="")
        self.status.add_class(f"unclip-{self.name}-status")
        self.upsample = W.Checkbox(value=upsample, description="upsample to 64 px", indent=False,
                                   disabled=pipe.upsampler is None)

    def _watch(self, *controls) -> None:
        for c in controls:
            c.observe(lambda change: self.update(), names="value")

    def _layout(self, *controls) -> W.VBox:
        return W.VBox([*controls, self.upsample, self.image, self.status])

    def _repr_mimebundle_(self, include=None, exclude=None):
        """The widget for a live kernel, plus a static picture for a saved notebook (see the module doc)."""
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        if self.images is not None:  # the strip `update()` already rendered for the image widget
            bundle["image/png"] = base64.b64encode(self.image.value).decode("ascii")
        bundle["text/plain"] = f"{type(self).__name__} ({self.caption_line()}): {self.status.value}"
        return bundle

    def _decode(self, z: torch.Tensor, x_t: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """The one thing a slider move runs: the decoder (deterministic, eta = 0), then the upsampler."""
        self.calls["decode"] += 1
        return manipulate.decode_latents(self.pipe, z, x_t, steps=self.steps, guidance_scale=guidance_scale,
                                         upsample=self.upsample.value)

    def _at_size(self, images: torch.Tensor) -> torch.Tensor:
        """Fixed images (the inputs) at the size the decodes come out at, in [-1, 1]."""
        upsampled = self.upsample.value and self.pipe.upsampler is not None
        return to_model_images(images, 2 * IMAGE_SIZE if upsampled else IMAGE_SIZE)

    def update(self) -> torch.Tensor | None:
        t0 = time.perf_counter()
        try:
            images = self.render()
        except (PipelineError, ValueError) as e:
            self.error = str(e)
            self.status.value = f"error: {e}"
            return None
        self.error = None
        self.seconds = time.perf_counter() - t0
        self.images = images
        self.image.value = to_png(images, self.scale)
        self.status.value = f"{self.describe()} · {self.seconds:.2f} s"
        return images

    def render(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def caption_line(self) -> str:  # pragma: no cover - abstract
        """What the strip shows, left to right, in words (the static picture's caption)."""
        raise NotImplementedError


def _as_image(x) -> torch.Tensor:
    """One image as (1, 3, H, W): uint8 or [-1, 1] float, (3, H, W) or (1, 3, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a caption (str) or an image tensor (3, H, W), got {type(x).__name__}")
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"expected one image of shape (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    return x


class InterpolationExplorer(Explorer):
    """Slerp between the z_i of two endpoints (paper §3.2); a θ slider and the x_T mode.

    An endpoint is an image (inverted: z_i from CLIP, x_T by DDIM inversion) or a caption (z_i
    from the prior, x_T the seed's noise; A uses `seed`, B `seed + 1`). Everything here decodes
    without the caption at guidance 1, as inversion does, so a caption's endpoint is not the image
    `pipe.generate` draws for it (that one also sees the caption, at guidance 3). In mode "fixed"
    every θ decodes from endpoint A's x_T; in mode "inverted" x_T is slerped between A's and B's
    too, so θ = 0 and θ = 1 give back the two endpoints.
    The strip shows A, the image at θ, and B. `names` labels image endpoints in the header (a
    caption endpoint is labelled by its caption).
    """

    name = "interpolation"

    def __init__(self, pipe, a, b, theta: float = 0.5, mode: str = "fixed", prior: str = "diffusion",
                 seed: int = 0, steps: int | None = None, upsample: bool = False, scale: int = 4,
                 names: tuple[str, str] = ("image A", "image B")):
        super().__init__(pipe, steps, upsample, scale)
        check_arg("theta", theta, none_ok=False)
        check_seed(seed)
        if len(names) != 2 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"names must be two strings (one per endpoint), got {names!r}")
        if mode not in ("fixed", "inverted"):
            raise ValueError(f"mode must be 'fixed' or 'inverted', got {mode!r}")
        self.prior, self.seed = prior, seed
        self.z_a, self.x_a = self._latents(a, seed)
        self.z_b, self.x_b = self._latents(b, seed + 1)
        self.labels = [x if isinstance(x, str) else name for x, name in zip((a, b), names)]
        self._ends: dict[bool, torch.Tensor] = {}  # upsample flag -> decoded endpoints (A, B)
        self.theta = _slider("θ", theta, 0.0, 1.0, 0.05, "unclip-interpolation-theta")
        self.mode = W.ToggleButtons(options=["fixed", "inverted"], value=mode, description="x_T")
        self.mode.add_class("unclip-interpolation-mode")
        self._watch(self.theta, self.mode, self.upsample)
        self.widget = self._layout(W.HTML(f"<b>A</b>: {html.escape(self.labels[0])} &nbsp; <b>B</b>: {html.escape(self.labels[1])}"),
                                   self.theta, self.mode)
        self.update()

    def _latents(self, x, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, str):
            caption = self.pipe.check_captions([x])
            if self.prior not in self.pipe.priors:
                raise PipelineError(f"prior {self.prior!r} is not loaded; loaded: {sorted(self.pipe.priors)}")
            self.calls["prior"] += 1
            z = self.pipe.priors[self.prior].sample(caption, seed=stage_seed(seed, "prior"))
            g = torch.Generator().manual_seed(stage_seed(seed, "decoder"))
            x_t = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
            return z, x_t
        self.calls["invert"] += 1
        return manipulate.invert(self.pipe, _as_image(x), steps=self.steps)

    def endpoints(self) -> torch.Tensor:
        """A and B decoded from their own latents (cached per upsample setting)."""
        key = bool(self.upsample.value)
        if key not in self._ends:
            self._ends[key] = self._decode(torch.cat([self.z_a, self.z_b]), torch.cat([self.x_a, self.x_b]))
        return self._ends[key]

    def latent(self, theta: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        z = manipulate.slerp(self.z_a, self.z_b, theta)
        x_t = self.x_a if mode == "fixed" else manipulate.slerp_flat(self.x_a, self.x_b, theta)
        return z, x_t

    def render(self) -> torch.Tensor:
        ends = self.endpoints()
        mid = self._decode(*self.latent(self.theta.value, self.mode.value))
        return torch.cat([ends[:1], mid, ends[1:]])

    def describe(self) -> str:
        return f"θ = {self.theta.value:.2f} · x_T {self.mode.value}"

    def caption_line(self) -> str:
        return f"A = {self.labels[0]!r}, the image at θ, B = {self.labels[1]!r}"


class TextDiffExplorer(Explorer):
    """Edit an image by a text diff (paper §3.3): z = slerp(z_i, norm(z_t − z_t0), θ), x_T fixed
    to the image's own inverted latent. The strip shows the image and the edit at θ."""

    name = "textdiff"

    def __init__(self, pipe, image, from_caption: str, to_caption: str, theta: float = 0.0,
                 steps: int | None = None, upsample: bool = False, scale: int = 4):
        super().__init__(pipe, steps, upsample, scale)
        check_arg("theta", theta, none_ok=False)
        self.source = _as_image(image)
        self.calls["invert"] += 1
        self.z, self.x_t = manipulate.invert(pipe, self.source, steps=steps)
        self._directions: dict[tuple[str, str], torch.Tensor] = {}
        self.from_caption = W.Text(value=from_caption, description="from", continuous_update=False)
        self.to_caption = W.Text(value=to_caption, description="to", continuous_update=False)
        self.theta = _slider("θ", theta, 0.0, 1.0, 0.05, "unclip-textdiff-theta")
        self._watch(self.from_caption, self.to_caption, self.theta, self.upsample)
        self.widget = self._layout(self.from_caption, self.to_caption, self.theta)
        self.update()

    def direction(self) -> torch.Tensor:
        key = tuple(self.pipe.check_captions([self.from_caption.value, self.to_caption.value]))
        if key[0] == key[1]:
            raise ValueError("the from and to captions are the same: there is no direction to move in")
        if key not in self._directions:
            self.calls["text"] += 1
            self._directions[key] = manipulate.text_diff_direction(self.pipe, *key)
        return self._directions[key]

    def render(self) -> torch.Tensor:
        z = manipulate.slerp(self.z, self.direction()[None], self.theta.value)
        return torch.cat([self._at_size(self.source), self._decode(z, self.x_t)])

    def describe(self) -> str:
        return f"θ = {self.theta.value:.2f} · {self.from_caption.value!r} → {self.to_caption.value!r}"

    def caption_line(self) -> str:
        return "the source image, then its edit at θ"


class GuidanceExplorer(Explorer):
    """One caption through the whole cascade, with both guidance scales and the seed as controls.

    Prior samples are kept per (caption, prior, prior guidance, seed), so moving the decoder's
    guidance slider re-runs only the decoder. Shows `n` samples.
    """

    name = "guidance"

    def __init__(self, pipe, caption: str, n: int = 4, prior: str = "diffusion", prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, seed: int = 0, steps: int | None = None,
                 upsample: bool = False, scale: int = 4):
        super().__init__(pipe, steps, upsample, scale)
        check_arg("n", n, minimum=1, integer=True, none_ok=False)
        check_sampling(seed=seed, prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale)
        self.n = n
        if prior not in pipe.priors:
            raise PipelineError(f"prior {prior!r} is not loaded; loaded: {sorted(pipe.priors)}")
        default_prior = getattr(pipe.priors[prior].cfg, "guidance_scale", 1.0)  # the AR prior has none
        self._z: dict[tuple, torch.Tensor] = {}
        self.caption = W.Text(value=caption, description="caption", continuous_update=False,
                              layout=W.Layout(width="420px"))
        self.prior = W.Dropdown(options=sorted(pipe.priors), value=prior, description="prior")
        self.prior_guidance_scale = _slider("prior guidance", default_prior if prior_guidance_scale is None else prior_guidance_scale,
                                      1.0, 8.0, 0.5, "unclip-guidance-prior")
        self.decoder_guidance_scale = _slider("decoder guidance",
                                        pipe.decoder.cfg.guidance_scale if decoder_guidance_scale is None else decoder_guidance_scale,
                                        1.0, 8.0, 0.5, "unclip-guidance-decoder")
        self.seed = W.BoundedIntText(value=seed, min=0, max=2 ** 31 - 1, description="seed")
        self._sync_prior_controls()
        self.prior.observe(lambda change: self._sync_prior_controls(), names="value")
        self._watch(self.caption, self.prior, self.prior_guidance_scale, self.decoder_guidance_scale, self.seed, self.upsample)
        self.widget = self._layout(self.caption, self.prior, self.prior_guidance_scale, self.decoder_guidance_scale, self.seed)
        self.update()

    def _sync_prior_controls(self) -> None:
        """The AR prior has no guidance: its slider is disabled (and ignored) while it is chosen."""
        self.prior_guidance_scale.disabled = self.prior.value == "ar"

    def z_i(self) -> torch.Tensor:
        caption = self.pipe.check_captions([self.caption.value])[0]
        guidance_scale = None if self.prior.value == "ar" else float(self.prior_guidance_scale.value)
        key = (caption, self.prior.value, guidance_scale, int(self.seed.value))
        if key not in self._z:
            self.calls["prior"] += 1
            self._z[key] = self.pipe.priors[key[1]].sample([caption] * self.n, guidance_scale=key[2],
                                                           seed=stage_seed(key[3], "prior"))
        return self._z[key]

    def render(self) -> torch.Tensor:
        z = self.z_i()
        self.calls["decode"] += 1
        return self.pipe.decode(z, [self.caption.value] * self.n, decoder_guidance_scale=float(self.decoder_guidance_scale.value),
                                steps=self.steps, seed=int(self.seed.value), upsample=self.upsample.value,
                                progress=False)

    def describe(self) -> str:
        prior = ("AR prior" if self.prior.value == "ar" else
                 f"diffusion prior, guidance {self.prior_guidance_scale.value:.1f}")
        return f"decoder guidance {self.decoder_guidance_scale.value:.1f} · {prior} · seed {self.seed.value}"

    def caption_line(self) -> str:
        return f"{self.n} samples of {self.caption.value!r}"
