"""The decoder: a diffusion U-Net that turns a CLIP image embedding z_i (and the caption) into a
32x32 image (paper §2.1).

Conditioning, as in the paper:
- z_i is projected and added to the timestep embedding;
- z_i is also projected into `n_z_tokens` extra context tokens, concatenated with the caption's
  per-token CLIP states, which the U-Net's attention layers attend to;
- for classifier-free guidance, z_i is replaced by a learned null 10% of the time, and the
  caption is dropped 50% of the time. Sampling mixes the conditional and the unconditional
  (both dropped) outputs with a guidance scale.

``caption_only=True`` builds the GLIDE-like baseline through the same code: z_i is never given
(it is always the learned null), so the caption is the only signal. As in GLIDE, the caption's
final token state is also projected into the timestep embedding (where unCLIP puts z_i), and the
caption is dropped for guidance as often as unCLIP drops z_i (`p_drop_z`): it is the baseline's
only condition, and dropping it half the time would waste half its training.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import geometry
from .clip import caption_states, embedding_cache
from .clip_model import ClipModel
from .config import DecoderConfig, Preset, from_dict, to_dict
from .data import dataset, rendered, require_shapesworld, source_config
from .diffusion import GaussianDiffusion, guided
from .images import IMAGE_SIZE, resize_uint8, to_float
from .judge import attribute_accuracy
from .runtime import autocast, seed_everything, stage_seed
from .stage import TrainedDenoiser, ensure_stage
from .shapes import ShapesWorld
from .train import clear_state, snapshot_path, train
from .unet import UNet



class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, z_dim: int, text_width: int):
        super().__init__()
        self.cfg = cfg
        ctx = cfg.context_dim
        self.unet = UNet(3, 3, cfg.base_channels, tuple(cfg.channel_mults), cfg.blocks_per_level,
                         tuple(cfg.attention_levels), cfg.heads, context_dim=ctx, dropout=cfg.dropout,
                         patch_size=cfg.patch_size)
        self.text_proj = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, ctx))
        self.null_token = nn.Parameter(torch.randn(1, 1, ctx) * 0.02)  # always attendable: no empty context
        self.null_z = nn.Parameter(torch.zeros(z_dim))  # the learned "no z_i" (in the standardised space)
        # z_i sits in a narrow cone (every z_i shares a large mean; per-dimension spread 0.06-0.16):
        # standardising it makes the differences between images unit-sized at the conditioning input
        self.register_buffer("z_mean", torch.zeros(z_dim))
        self.register_buffer("z_std", torch.ones(z_dim))
        if cfg.caption_only:  # GLIDE: the caption's last token stands in for a class embedding
            self.caption_emb = nn.Linear(ctx, self.unet.emb_dim)
        else:
            self.z_emb = nn.Linear(z_dim, self.unet.emb_dim)
            self.z_tokens = nn.Linear(z_dim, cfg.n_z_tokens * ctx)

    def set_z_stats(self, image_embed: torch.Tensor) -> None:
        """Store the per-dimension mean and std of the training z_i (cfg.z_norm == "standard")."""
        if self.cfg.z_norm == "standard":
            self.z_mean.copy_(image_embed.float().mean(0))
            self.z_std.copy_(image_embed.float().std(0).clamp_min(1e-4))
        elif self.cfg.z_norm != "none":
            raise ValueError(f"unknown z_norm {self.cfg.z_norm!r}; choose 'standard' or 'none'")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor, drop_z: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, 3, 32, 32), t (B,), z (B, z_dim) unit-norm z_i, states (B, L, width) caption token
        states, mask (B, L) True for real tokens; drop_z / drop_text (B,) bool select the nulls."""
        b = x_t.shape[0]
        tokens = [self.null_token.expand(b, -1, -1)]
        keep = [torch.ones(b, 1, dtype=torch.bool, device=x_t.device)]
        emb = None
        if not self.cfg.caption_only:
            z = (z - self.z_mean.to(z.dtype)) / self.z_std.to(z.dtype)
            if drop_z is not None:
                z = torch.where(drop_z[:, None], self.null_z.to(z.dtype).expand_as(z), z)
            emb = self.z_emb(z)
            tokens.append(self.z_tokens(z).view(b, self.cfg.n_z_tokens, -1))
            keep.append(torch.ones(b, self.cfg.n_z_tokens, dtype=torch.bool, device=x_t.device))
        text = self.text_proj(states.to(self.null_token.dtype))
        tokens.append(text)
        text_keep = mask.bool()
        if drop_text is not None:
            text_keep = text_keep & ~drop_text[:, None]
        keep.append(text_keep)
        if self.cfg.caption_only:  # the last real token's state; zero when the caption is dropped or absent
            last = text[torch.arange(b, device=text.device), (text_keep.sum(1) - 1).clamp_min(0)]
            emb = self.caption_emb(last * text_keep.any(1, keepdim=True).to(last.dtype))
        context = torch.cat([tk.to(tokens[0].dtype) for tk in tokens], 1)
        return self.unet(x_t, t, emb, context, torch.cat(keep, 1))


def make_diffusion(cfg: DecoderConfig) -> GaussianDiffusion:
    return GaussianDiffusion.from_schedule(cfg.schedule, 1000, cfg.objective)


# ---------------------------------------------------------------------------------------------
# Training


class DecoderBatches:
    """`get_batch(step)`: 32 px images with their cached z_i and caption token states, plus the
    timestep, noise and condition-dropout draws (all a pure function of the step)."""

    def __init__(self, images: torch.Tensor, cache: dict, cfg: DecoderConfig, seed: int):
        self.images = resize_uint8(images, IMAGE_SIZE)
        self.cache, self.cfg, self.seed = cache, cfg, seed
        self.diffusion = make_diffusion(cfg)
        # the baseline's caption is its only condition: dropped as often as unCLIP's z_i
        self.p_drop_text = cfg.p_drop_z if cfg.caption_only else cfg.p_drop_text
        if len(self.images) != len(cache["image_embed"]):
            raise ValueError(f"{len(self.images)} images but {len(cache['image_embed'])} cached embeddings")

    def __call__(self, step: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        b = self.cfg.train.batch_size
        idx = torch.randint(len(self.images), (b,), generator=g)
        rows = self.cache["caption_index"][idx]
        x_start = to_float(self.images[idx])
        return {"x_start": x_start, "z": self.cache["image_embed"][idx], "states": self.cache["text_states"][rows].float(),
                "mask": self.cache["text_mask"][rows],
                "t": self.diffusion.sample_t(b, g, self.cfg.t_sampling, self.cfg.t_logsnr),
                "noise": torch.randn(x_start.shape, generator=g),
                "drop_z": torch.rand(b, generator=g) < self.cfg.p_drop_z,
                "drop_text": torch.rand(b, generator=g) < self.p_drop_text}


def decoder_loss(diffusion: GaussianDiffusion, min_snr_gamma: float | None = None):
    return diffusion.batch_loss(lambda model, b, x, t: model(x, t, b["z"], b["states"], b["mask"], b["drop_z"], b["drop_text"]),
                                min_snr_gamma)


# ---------------------------------------------------------------------------------------------
# Sampling


class TrainedDecoder(TrainedDenoiser):
    """A trained decoder with its config and diffusion, for sampling."""

    make_diffusion = staticmethod(make_diffusion)

    def model_fn(self, z: torch.Tensor | None, states: torch.Tensor, mask: torch.Tensor, guidance_scale: float):
        """fn(x_t, t) for the sampler: guided, bf16 where enabled, output in float32. z=None runs
        the decoder on the caption alone (z_i replaced by the learned null, as in training)."""
        no_z = z is None
        if no_z:
            z = torch.zeros(len(states), self.model.null_z.numel())
        z, states, mask = z.to(self.device), states.to(self.device).float(), mask.to(self.device)

        def raw(x, t, drop):
            n = x.shape[0] // z.shape[0]  # guided() doubles the batch
            drop_z = torch.ones_like(drop) if no_z else drop
            with torch.no_grad(), autocast(self.device, self.precision):
                out = self.model(x, t, z.repeat(n, 1), states.repeat(n, 1, 1), mask.repeat(n, 1), drop_z, drop)
            return out.float()
        return guided(raw, guidance_scale)

    def sample(self, z: torch.Tensor | None, states: torch.Tensor, mask: torch.Tensor, steps: int | None = None,
               guidance_scale: float | None = None, eta: float | None = 0.0, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1] for z_i (or None: the caption alone) and caption
        states; eta=None is DDPM. Most callers want `decode`, which draws x_T from a seed."""
        steps = steps or self.cfg.sample_steps
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        diffusion = self.diffusion.respaced(steps)
        out, n = [], len(states)
        for i in tqdm(range(0, n, batch_size), desc="decoder", disable=not progress, leave=False):
            sl = slice(i, i + batch_size)
            start = noise[sl] if noise is not None else (min(batch_size, n - i), 3, IMAGE_SIZE, IMAGE_SIZE)
            fn = self.model_fn(None if z is None else z[sl], states[sl], mask[sl], guidance_scale)
            out.append(diffusion.sample(fn, start, eta=eta, generator=generator, device=self.device).cpu())
        return torch.cat(out)

    def decode(self, z: torch.Tensor | None, states: torch.Tensor, mask: torch.Tensor, seed: int = 0,
               steps: int | None = None, guidance_scale: float | None = None, eta: float | None = 0.0,
               noise: torch.Tensor | None = None, batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """The one z_i -> 32 px path. x_T is drawn per image from one generator seeded by
        `stage_seed(seed, "decoder")` (or given as `noise`: an inverted latent, say), and the
        same generator goes on to draw the per-step noise when eta > 0; so "seed 0" is the
        same x_T in every notebook, and with eta = 0 the batch size does not matter."""
        g = torch.Generator().manual_seed(stage_seed(seed, "decoder"))
        if noise is None:
            noise = torch.randn(len(states), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        return self.sample(z, states, mask, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=g, noise=noise,
                           batch_size=batch_size, progress=progress)

    def invert(self, images: torch.Tensor, z: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
               steps: int | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """DDIM inversion of 32 px images in [-1, 1] under their condition: x_0 -> x_T."""
        diffusion = self.diffusion.respaced(steps or self.cfg.sample_steps)
        return diffusion.ddim_invert(self.model_fn(z, states, mask, guidance_scale), images.to(self.device)).cpu()


# ---------------------------------------------------------------------------------------------
# The artifact


def _stage_config(preset: Preset, clip: ClipModel, caption_only: bool) -> dict:
    cfg = to_dict(preset.decoder)
    cfg["caption_only"] = caption_only
    return {"decoder": cfg, **source_config(preset), "clip_fingerprint": clip.fingerprint()}


def train_decoder(preset: Preset, clip: ClipModel, out_dir: str | Path, caption_only: bool = False,
                  progress: bool = True, evaluate=None) -> TrainedDecoder:
    """Train the decoder on the CLIP embedding cache of the preset's train split and save it.

    `evaluate(trained) -> dict` (optional) adds metrics before the artifact is written.
    """
    cfg = dataclasses.replace(preset.decoder, caption_only=caption_only)
    if not 0 < cfg.baseline_steps <= cfg.train.steps:
        raise ValueError(f"decoder.baseline_steps must lie in 1..train.steps ({cfg.train.steps}), got {cfg.baseline_steps}")
    # the baseline stops at baseline_steps of the same schedule; the unCLIP decoder keeps a snapshot there
    schedule = {"stop_after": cfg.baseline_steps} if caption_only else {"snapshot_steps": (cfg.baseline_steps,)}
    out_dir = Path(out_dir)
    cache_dir = out_dir.parent / "cache"
    train_data = dataset(preset, "train")
    cache = embedding_cache(clip, train_data, cfg.n_train_images, cache_dir)
    images = rendered(train_data, cfg.n_train_images, cache_dir)["images"]
    stage_config = _stage_config(preset, clip, caption_only)
    seed_everything(cfg.train.seed)
    model = Decoder(cfg, clip.embed_dim, clip.width)  # NCHW: channels_last measured slower here
    model.set_z_stats(cache["image_embed"])
    diffusion = make_diffusion(cfg)
    train_metrics = train(model, decoder_loss(diffusion, cfg.min_snr_gamma), DecoderBatches(images, cache, cfg, cfg.train.seed),
                          cfg.train, run_dir=out_dir, progress=progress,
                          desc="decoder" + (" (caption only)" if caption_only else ""), run_config=stage_config, **schedule)
    trained = TrainedDecoder(model, cfg, device=cfg.train.device)
    trained.text_length = int(cache["text_mask"].shape[1])
    metrics = {"train": train_metrics, "n_params": sum(p.numel() for p in model.parameters())}
    if evaluate is not None:
        metrics.update(evaluate(trained))
    ckpt.save_stage(out_dir, "decoder", model.state_dict(), stage_config, metrics,
                    extra={"z_dim": clip.embed_dim, "text_width": clip.width, "text_length": int(cache["text_mask"].shape[1])})
    clear_state(out_dir)
    trained.metrics = ckpt.read_json(out_dir / ckpt.METRICS)
    return trained


def load_decoder(folder: str | Path, preset: Preset | None = None, clip: ClipModel | None = None,
                 caption_only: bool = False, snapshot: int | None = None) -> TrainedDecoder:
    """A decoder artifact; `snapshot=k` loads its EMA weights after k training steps instead of the
    final ones (the unCLIP decoder keeps step `baseline_steps`, see DecoderConfig)."""
    expected = _stage_config(preset, clip, caption_only) if preset is not None and clip is not None else None
    state, meta, metrics = ckpt.load_stage(folder, "decoder", expected)
    cfg = from_dict(DecoderConfig, meta["config"]["decoder"])
    model = Decoder(cfg, meta["z_dim"], meta["text_width"])
    if snapshot is not None:
        path = snapshot_path(folder, snapshot)
        if not path.exists():
            kept = sorted(p.name for p in (Path(folder) / "snapshots").glob("*.safetensors"))
            raise ckpt.ArtifactError(f"{path} is missing: {folder} keeps the snapshots {kept or 'none'}; retrain the "
                                     f"decoder to get step {snapshot} (DecoderConfig.baseline_steps)")
        state = ckpt.load_tensors(path)
    model.load_state_dict(state)
    trained = TrainedDecoder(model, cfg, device=cfg.train.device, metrics=metrics)
    trained.text_length = meta["text_length"]
    return trained


REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "reference" / "decoder"


def load_reference_decoder(clip: ClipModel, folder: str | Path = REFERENCE_DIR) -> tuple[TrainedDecoder | None, str]:
    """The reference decoder shipped with the course, if it fits `clip`: (decoder, "") or (None, why not).

    It is the course architecture and recipe trained far longer than a CPU allows, by the
    project's own command (`folder/made_by.json` holds the command, device and time). A decoder
    only makes sense next to the CLIP whose z_i it learned to invert, so it is offered only when
    `clip`'s fingerprint equals the one it was trained against (the course CLIP is deterministic
    for a seed on a given machine and torch build; elsewhere it differs, and the reason says so).
    """
    folder = Path(folder)
    if not ckpt.stage_exists(folder):
        return None, f"no reference decoder at {folder}"
    stored = ckpt.read_json(folder / ckpt.CONFIG)["config"].get("clip_fingerprint")
    mine = clip.fingerprint()
    if stored != mine:
        return None, (f"the reference decoder was trained against CLIP {stored}; this CLIP is {mine} (trained on "
                      "another machine or torch build), so its z_i would be foreign to it")
    return load_decoder(folder), ""


def ensure_decoder(artifacts_dir: str | Path, preset: Preset, clip: ClipModel, judge=None, caption_only: bool = False,
                   retrain: bool = False, progress: bool = True) -> TrainedDecoder:
    """Load the decoder (`decoder` or `decoder_caption_only`), training it if missing or stale.

    Given the `judge`, a newly trained decoder measures itself (`evaluate_decoder`) before its
    artifact is written, so metrics.json holds the reconstruction and sampler numbers; without
    one it holds the training numbers only. `build.ensure_all` passes the judge in.
    """
    folder = Path(artifacts_dir) / ("decoder_caption_only" if caption_only else "decoder")
    evaluate = None
    if judge is not None:
        def evaluate(trained):
            return evaluate_decoder(trained, clip, judge, preset, Path(artifacts_dir) / "cache", progress=progress)
    return ensure_stage(folder, "decoder", lambda: load_decoder(folder, preset, clip, caption_only),
                        lambda: train_decoder(preset, clip, folder, caption_only, progress, evaluate), retrain)


# ---------------------------------------------------------------------------------------------
# Evaluation


def decode_split(trained: TrainedDecoder, clip: ClipModel, data: dict, steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = 0.0, seed: int = 0,
                 z: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a rendered split's own z_i (or the given `z`) with its captions (`TrainedDecoder.decode`)."""
    z = clip.encode_images(data["images"]) if z is None else z
    states, mask = caption_states(clip, data["captions"], trained.text_length)
    return trained.decode(z, states, mask, seed=seed, steps=steps, guidance_scale=guidance_scale, eta=eta)


def samplers_for(cfg: DecoderConfig) -> list[tuple[str, int, float | None]]:
    """The sampler comparison: (label, steps, eta) for DDIM at every `compare_steps`, and ancestral
    DDPM (eta None) at the largest two."""
    steps = sorted(cfg.compare_steps)
    return [(f"DDIM {n}", n, 0.0) for n in steps] + [(f"DDPM {n}", n, None) for n in steps[-2:]]


def reconstruction_report(trained: TrainedDecoder, clip: ClipModel, judge, preset: Preset, n: int,
                          cache_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Decode the true z_i of the first `n` val and held-out scenes (with their captions, default
    steps and guidance) and read them twice: "reconstruction" by the judge, "strict" (shape and
    size) by `geometry.strict_accuracy`; "reference" and "strict"[split]["real"] read the real
    scenes, the ceiling."""
    require_shapesworld(preset, "the decoder's reconstruction measurements")
    out = {"n_eval": n, "steps": trained.cfg.sample_steps, "guidance": trained.cfg.guidance_scale, "seed": seed}
    t0 = time.perf_counter()
    for split in ("val", "heldout"):
        data = rendered(ShapesWorld(split, preset.world), n, cache_dir)
        images = decode_split(trained, clip, data, seed=seed)
        out.setdefault("reconstruction", {})[split] = attribute_accuracy(images, data["attributes"], judge)
        out.setdefault("reference", {})[split] = attribute_accuracy(data["images"], data["attributes"], judge)
        out.setdefault("strict", {})[split] = {"decoded": geometry.strict_accuracy(images, data["attributes"]),
                                                "real": geometry.strict_accuracy(data["images"], data["attributes"])}
    out["reconstruction_s"] = round(time.perf_counter() - t0, 1)
    return out


def evaluate_decoder(trained: TrainedDecoder, clip: ClipModel, judge, preset: Preset, cache_dir: str | Path | None = None,
                     seed: int = 0, progress: bool = False) -> dict:
    """The decoder's own measurements (paper §2.1, scored by the judge, never by the decoder):

    - "reconstruction": decode the true z_i of `n_eval` val scenes (and of held-out-composition
      scenes) with their captions, at the default steps and guidance, and read the attributes
      back with the judge. "reference" is the judge on the real scenes, the ceiling.
    - "strict": shape and size of the same decodes (and of the real scenes) by the strict
      geometric reading (`geometry.strict_accuracy`), which a round blob cannot pass as a square.
    - "samplers": the same on the first `n_compare` val scenes for each sampler of `samplers_for`,
      with the same starting noise for every sampler.
    The caption_only baseline is scored the same way (its z_i is ignored).
    """
    from tqdm.auto import tqdm

    cfg = trained.cfg
    out = reconstruction_report(trained, clip, judge, preset, cfg.n_eval, cache_dir, seed)
    val = rendered(ShapesWorld("val", preset.world), cfg.n_compare, cache_dir)
    z = clip.encode_images(val["images"])
    out["samplers"] = {}
    for label, steps, eta in tqdm(samplers_for(cfg), desc="samplers", disable=not progress, leave=False):
        t0 = time.perf_counter()
        images = decode_split(trained, clip, val, steps=steps, eta=eta, seed=seed, z=z)
        out["samplers"][label] = {"steps": steps, "eta": eta, "n": len(z), "seconds": round(time.perf_counter() - t0, 1),
                                  **attribute_accuracy(images, val["attributes"], judge),
                                  "strict_shape": geometry.strict_accuracy(images, val["attributes"])["shape"]}
    return out
