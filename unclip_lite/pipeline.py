"""`UnCLIP`: the whole cascade, caption -> prior -> decoder -> upsampler (paper §2, Fig. 2).

    pipe = UnCLIP.from_artifacts("build/artifacts")
    images = pipe.generate(["a large red circle on a striped background"], seed=0)   # (N, 3, 64, 64)

Each stage is loaded from its own artifact folder. Stages that read CLIP embeddings (priors,
decoder) store the fingerprint of the CLIP weights they were trained on; `from_artifacts`
refuses a set of stages that do not agree, naming the stage, instead of producing quiet noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import diff as config_diff
from .clip import caption_states, load_clip_stage
from .clip_model import ClipModel
from .decoder import TrainedDecoder, load_decoder
from .prior import load_prior
from .runtime import check_arg, check_seed, stage_seed
from .upsampler import load_upsampler

PRIOR_KINDS = ("diffusion", "ar")


class PipelineError(ValueError):
    """Bad input to the pipeline, or stages that do not fit together."""


def check_sampling(seed: int = 0, batch_size: int = 1, **settings) -> None:
    """Refuse bad sampling arguments before any work, naming each: guidance scales and eta are
    finite and >= 0, steps an integer >= 1, batch_size an integer >= 1, the seed in [0, 2**63)."""
    check_seed(seed)
    check_arg("batch_size", batch_size, minimum=1, integer=True, none_ok=False)
    for name, value in settings.items():
        check_arg(name, value, minimum=1, integer=True) if name == "steps" else check_arg(name, value)


class UnCLIP:
    """Text -> z_i (a prior) -> 32 px (the decoder) -> 64 px (the upsampler).

    `priors` maps "diffusion" / "ar" to trained priors (either may be missing); `upsampler` may
    be None, in which case `generate` returns 32 px images.
    """

    def __init__(self, clip: ClipModel, decoder: TrainedDecoder, priors: dict, upsampler=None,
                 folder: Path | None = None):
        if not priors:
            raise PipelineError("UnCLIP needs at least one prior ('diffusion' or 'ar')")
        self.clip, self.decoder, self.priors, self.upsampler, self.folder = clip, decoder, priors, upsampler, folder

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_artifacts(cls, folder: str | Path, priors: tuple[str, ...] = PRIOR_KINDS,
                       upsampler: bool = True) -> "UnCLIP":
        """Load CLIP, the decoder, the priors and the upsampler from one artifacts folder.

        Raises PipelineError naming the stage when a stage folder is missing, or when a stage was
        trained against another CLIP than the one in `folder/clip`.
        """

        folder = Path(folder)
        wanted = ["clip", "decoder"] + [f"prior_{k}" for k in priors] + (["upsampler"] if upsampler else [])
        missing = [name for name in wanted if not ckpt.stage_exists(folder / name)]
        if missing:
            raise PipelineError(
                f"{folder}: missing stage folder(s) {missing} (each needs model.safetensors, config.json and "
                f"metrics.json). Run the notebooks up to 05, or `python -m unclip_lite course --artifacts {folder}`.")
        clip = load_clip_stage(folder / "clip")
        fingerprint = clip.fingerprint()
        clip_config = ckpt.read_json(folder / "clip" / ckpt.CONFIG)["config"]
        source = clip_config.get("world", clip_config.get("data"))  # ShapesWorld's world, or a caption folder
        for name in wanted[1:]:
            stored = ckpt.read_json(folder / name / ckpt.CONFIG)["config"]
            if name != "upsampler" and stored.get("clip_fingerprint") != fingerprint:
                raise PipelineError(
                    f"{folder / name} was trained against another CLIP (fingerprint {stored.get('clip_fingerprint')}) "
                    f"than {folder / 'clip'} ({fingerprint}); retrain {name}, or load it with its own CLIP.")
            theirs = stored.get("world", stored.get("data"))
            if theirs is not None and theirs != source:
                differences = "; ".join(config_diff(theirs, source))
                raise PipelineError(f"{folder / name} was trained on other data than {folder / 'clip'} "
                                    f"({name} != clip: {differences}); retrain {name}.")
        decoder = load_decoder(folder / "decoder")
        trained_priors = {k: load_prior(folder / f"prior_{k}", clip=clip, kind=k) for k in priors}
        up = load_upsampler(folder / "upsampler") if upsampler else None
        return cls(clip, decoder, trained_priors, up, folder)

    # -- input checks --------------------------------------------------------------------------
    def check_captions(self, captions) -> list[str]:
        """A non-empty list of non-empty captions that fit CLIP's context, or a PipelineError."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            raise PipelineError("no captions given: pass a non-empty list of strings")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise PipelineError(f"caption {i} is empty or not a string: {c!r}")
        context = self.clip.context_length
        lengths = [len(self.clip.tokenizer.encode(c)) + 2 for c in captions]  # + start and end tokens
        for i, n in enumerate(lengths):
            if n > context:
                raise PipelineError(f"caption {i} is {n} tokens long, longer than CLIP's context of {context} "
                                    f"tokens: {captions[i]!r}")
            for kind, prior in self.priors.items():
                if n > prior.text_length:
                    raise PipelineError(f"caption {i} is {n} tokens long, longer than the longest caption the {kind} prior "
                                        f"was trained on ({prior.text_length} tokens): {captions[i]!r}")
        return captions

    def caption_states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's caption input: CLIP token states and mask, at least the decoder's cache
        length (so batches are padded alike) and never cutting a caption short."""
        return caption_states(self.clip, captions, self.decoder.text_length)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, captions, prior: str = "diffusion", prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                 upsample: bool = True, batch_size: int = 16, progress: bool = True,
                 return_intermediates: bool = False):
        """Images for captions: (N, 3, 64, 64) in [-1, 1] (32 px without the upsampler).

        `prior` picks the prior; `prior_guidance_scale` and `decoder_guidance_scale` are the two guidance
        scales (None: each stage's default); `steps` the decoder's DDIM steps. The same seed gives
        the same images. With `return_intermediates`, returns a dict with "z_i", "x32" and "x64".
        """
        captions = self.check_captions(captions)
        check_sampling(prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale, steps=steps,
                       batch_size=batch_size, seed=seed)
        if prior not in self.priors:
            raise PipelineError(f"prior {prior!r} is not loaded; loaded: {sorted(self.priors)}")
        z = self.priors[prior].sample(captions, guidance_scale=prior_guidance_scale, seed=stage_seed(seed, "prior"))  # (N, D)
        return self.decode(z, captions, decoder_guidance_scale=decoder_guidance_scale, steps=steps, seed=seed, upsample=upsample,
                           batch_size=batch_size, progress=progress, return_intermediates=return_intermediates)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, captions: list[str], decoder_guidance_scale: float | None = None,
               steps: int | None = None, seed: int = 0, upsample: bool = True, batch_size: int = 16,
               progress: bool = True, noise: torch.Tensor | None = None, eta: float = 0.0,
               return_intermediates: bool = False):
        """Decode given z_i (N, D) with their captions (`TrainedDecoder.decode`: x_T from the seed, or
        `noise`), then upsample."""
        if len(captions) != len(z):
            raise PipelineError(f"{len(z)} embeddings z_i but {len(captions)} captions: give one caption per z_i")
        check_sampling(decoder_guidance_scale=decoder_guidance_scale, steps=steps, batch_size=batch_size, eta=eta, seed=seed)
        states, mask = self.caption_states(captions)
        x32 = self.decoder.decode(z, states, mask, seed=seed, steps=steps, guidance_scale=decoder_guidance_scale, eta=eta,
                                  noise=noise, batch_size=batch_size, progress=progress)
        x64 = None
        if upsample and self.upsampler is not None:  # noise drawn per image inside: batch-independent
            x64 = self.upsampler.upsample(x32, seed=stage_seed(seed, "upsampler"), batch_size=batch_size)
        out = {"z_i": z, "x32": x32, "x64": x64}
        if return_intermediates:
            return out
        return out["x64"] if out["x64"] is not None else out["x32"]


# ---------------------------------------------------------------------------------------------
# Loading or training every stage, and measuring the whole cascade


