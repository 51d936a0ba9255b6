"""Decoder recipes compared at equal CPU time, with learning curves, scored twice.

    python benchmarks/decoder_recipes.py --variant base --seconds 300
    python benchmarks/decoder_recipes.py --list

One run trains one decoder variant of the course preset for a fixed wall-clock budget on this
machine and scores it. The budget becomes a step count before training starts: a 12-step probe
of the variant times its training step, and steps = budget / step time, so every variant gets the
same CPU time and a normal learning-rate schedule (warmup, cosine decay) over it. EMA snapshots at
`--points` fractions of the run give the learning curve: each is decoded (true z_i of val scenes
with their captions, DDIM, guidance 3) and read by the judge *and* by the strict geometric reader
(`unclip_lite.geometry`). The final weights are also scored on held-out compositions, and with
autoguidance (Karras et al. 2024: the final model guided by its own earliest snapshot instead of
by its unconditional output), which costs no training.

CLIP and the judge come from `--artifacts` (trained there at the course preset if missing), so
every variant sees the same z_i. Results go to build/recipes/<variant>.json; `--table` prints the
comparison of every result there. Run variants one at a time: two at once halve each one's CPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unclip_lite import geometry  # noqa: E402
from unclip_lite.clip import caption_states, embedding_cache, ensure_clip  # noqa: E402
from unclip_lite.config import get_preset, set_field  # noqa: E402
from unclip_lite.data import rendered  # noqa: E402
from unclip_lite.decoder import Decoder, DecoderBatches, TrainedDecoder, decode_split, decoder_loss, make_diffusion  # noqa: E402
from unclip_lite.images import IMAGE_SIZE  # noqa: E402
from unclip_lite.judge import attribute_accuracy, ensure_judge  # noqa: E402
from unclip_lite.runtime import seed_everything, stage_seed  # noqa: E402
from unclip_lite.shapes import ShapesWorld  # noqa: E402
from unclip_lite.checkpoint import load_tensors  # noqa: E402
from unclip_lite.train import snapshot_path, train  # noqa: E402

OUT = ROOT / "build" / "recipes"
COLLECTED = ROOT / "data" / "decoder_recipes.json"  # what notebook 05 shows (`--collect` writes it)

# Each variant: overrides of the course preset's DecoderConfig (dotted paths), and optionally a
# rotation spread of the training scenes (a fraction of each shape's symmetry period; 1 = the world's).
VARIANTS: dict[str, dict] = {
    "base": {},  # the course recipe: cosine, v, Min-SNR-5, batch 32, lr 2e-3, uniform t
    "batch64": {"train.batch_size": 64, "train.lr": 3e-3, "t_sampling": "stratified"},
    "batch128": {"train.batch_size": 128, "train.lr": 4e-3, "t_sampling": "stratified"},
    "stratified": {"t_sampling": "stratified"},
    "logsnr": {"t_sampling": "logsnr", "t_logsnr": (1.0, 2.0)},
    "logsnr-mid": {"t_sampling": "logsnr", "t_logsnr": (0.0, 1.5)},
    "edm-weight": {"t_sampling": "logsnr", "t_logsnr": (1.0, 2.0), "min_snr_gamma": None},
    "attn16": {"channel_mults": (1, 2, 2), "attention_levels": (1, 2)},  # no 4 px level; attention at 16 and 8 px
    "wide16": {"channel_mults": (1, 3, 3), "attention_levels": (1, 2)},  # ...and a wider 16 px level
    "rot0": {"_rotation_spread": 0.0},  # diagnostic: every training object at rotation 0
    "rot25": {"_rotation_spread": 0.25},  # diagnostic: a quarter of the symmetry period
}


class RotationLimited(ShapesWorld):
    """The train split with every object's rotation scaled into `spread` of its symmetry period."""

    def __init__(self, cfg, spread: float):
        super().__init__("train", cfg)
        self.spread = spread

    def attributes(self, index: int) -> dict:
        attrs = super().attributes(index)
        for obj in attrs["objects"]:
            obj["rotation"] *= self.spread
        return attrs


def decode(trained: TrainedDecoder, clip, data: dict, z: torch.Tensor, steps: int, guidance_scale: float,
           weak: TrainedDecoder | None = None, seed: int = 0) -> torch.Tensor:
    """Decode z_i with the captions (the x_T `TrainedDecoder.decode` draws for `seed`); `weak` given: autoguidance,
    the strong model guided by the weak one (weak + s * (strong - weak)) instead of by its own
    unconditional output."""
    if weak is None:
        return decode_split(trained, clip, data, steps=steps, guidance_scale=guidance_scale, seed=seed, z=z)
    states, mask = caption_states(clip, data["captions"], trained.text_length)
    noise = torch.randn(len(z), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(stage_seed(seed, "decoder")))
    strong_fn, weak_fn = trained.model_fn(z, states, mask, 1.0), weak.model_fn(z, states, mask, 1.0)

    def fn(x, t):
        w = weak_fn(x, t)
        return w + guidance_scale * (strong_fn(x, t) - w)
    return trained.diffusion.respaced(steps).sample(fn, noise, eta=0.0)


def score(images: torch.Tensor, data: dict, judge) -> dict:
    acc = attribute_accuracy(images, data["attributes"], judge)
    strict = geometry.strict_accuracy(images, data["attributes"])
    return {"judge_shape": acc["shape"], "judge_colour": acc["colour"], "judge_size": acc["size"],
            "judge_joint": acc["joint"], "strict_shape": strict["shape"], "strict_size": strict["size"]}


def run(variant: str, seconds: float, points: tuple[float, ...], artifacts: Path, n_curve: int, n_final: int,
        steps_eval: int, guidance_scale: float) -> dict:
    overrides = dict(VARIANTS[variant])
    spread = overrides.pop("_rotation_spread", None)
    preset = get_preset("course")
    clip = ensure_clip(artifacts, preset, progress=False)
    judge = ensure_judge(artifacts, preset, progress=False)
    cfg = preset.decoder
    for path, value in overrides.items():
        cfg = set_field(cfg, path, value)
    cache_dir = artifacts / "cache"
    world = ShapesWorld("train", preset.world)
    if spread is not None:
        world, cache_dir = RotationLimited(preset.world, spread), artifacts / f"cache-rot{spread}"
    cache = embedding_cache(clip, world, cfg.n_train_images, cache_dir)
    images = rendered(world, cfg.n_train_images, cache_dir)["images"]

    def build():
        seed_everything(cfg.train.seed)
        model = Decoder(cfg, clip.embed_dim, clip.width)
        model.set_z_stats(cache["image_embed"])
        return model

    loss_fn = decoder_loss(make_diffusion(cfg), cfg.min_snr_gamma)
    batches = DecoderBatches(images, cache, cfg, cfg.train.seed)
    # the probe: time the variant's training step (after 4 warm-up steps)
    probe_cfg = dataclasses.replace(cfg.train, steps=12, checkpoint_every=0)
    probe = train(build(), loss_fn, batches, probe_cfg, progress=False)
    step_s = probe["wall_s"] / 12
    steps = max(50, int(seconds / step_s))
    train_cfg = dataclasses.replace(cfg.train, steps=steps, checkpoint_every=0,
                                    warmup_steps=min(cfg.train.warmup_steps, steps // 10))
    cfg = dataclasses.replace(cfg, train=train_cfg)
    snaps = tuple(sorted({max(1, round(steps * p)) for p in points}))
    run_dir = OUT / "runs" / variant
    for old in [*(run_dir / "snapshots").glob("*.safetensors"), run_dir / "train_state.safetensors"]:
        old.unlink(missing_ok=True)
    model = build()
    batches = DecoderBatches(images, cache, cfg, cfg.train.seed)
    metrics = train(model, loss_fn, batches, cfg.train, run_dir=run_dir, progress=False, desc=variant,
                    snapshot_steps=snaps)
    (run_dir / "train_state.safetensors").unlink(missing_ok=True)
    result = {"variant": variant, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[variant].items()},
              "budget_s": seconds, "probe_step_s": round(step_s, 4), "steps": steps,
              "batch_size": cfg.train.batch_size, "train_wall_s": metrics["wall_s"],
              "images_per_s": metrics["samples_per_s"], "final_loss": metrics["final_loss"],
              "n_params": sum(p.numel() for p in model.parameters()),
              "eval": {"steps": steps_eval, "guidance": guidance_scale, "n_curve": n_curve}}

    measure(result, model, cfg, int(cache["text_mask"].shape[1]), run_dir, snaps, metrics["wall_s"] / steps, clip, judge,
            preset, artifacts, n_curve, n_final, steps_eval, guidance_scale)
    return result


def measure(result: dict, model: Decoder, cfg, text_length: int, run_dir: Path, snaps, step_s: float, clip, judge,
            preset, artifacts: Path, n_curve: int, n_final: int, steps_eval: int, guidance_scale: float) -> None:
    """Decode val z_i with every snapshot (the learning curve) and with the last one (val, held-out,
    autoguidance), and score each with the judge and the strict reading, into `result`."""
    def trained_at(step: int) -> TrainedDecoder:
        m = copy.deepcopy(model)
        m.load_state_dict(load_tensors(snapshot_path(run_dir, step)))
        t = TrainedDecoder(m, cfg)
        t.text_length = text_length
        return t

    val = rendered(ShapesWorld("val", preset.world), max(n_curve, n_final), artifacts / "cache")
    z_val = clip.encode_images(val["images"])
    curve_data = {k: v[:n_curve] for k, v in val.items()}
    result["curve"] = []
    for step in snaps:
        t0 = time.perf_counter()
        imgs = decode(trained_at(step), clip, curve_data, z_val[:n_curve], steps_eval, guidance_scale)
        row = {"step": step, "cpu_minutes": round(step * step_s / 60, 2), **score(imgs, curve_data, judge)}
        result["curve"].append(row)
        print(f"  step {step:5d} ({row['cpu_minutes']:.1f} min): judge shape {row['judge_shape']:.3f} "
              f"strict {row['strict_shape']:.3f} joint {row['judge_joint']:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    final = trained_at(snaps[-1])
    held = rendered(ShapesWorld("heldout", preset.world), n_final, artifacts / "cache")
    result["final"] = {"val": score(decode(final, clip, val, z_val, steps_eval, guidance_scale), val, judge),
                       "heldout": score(decode(final, clip, held, clip.encode_images(held["images"]), steps_eval, guidance_scale),
                                        held, judge),
                       "n": n_final}
    weak = trained_at(snaps[0])
    result["autoguidance"] = {f"s={s}": score(decode(final, clip, val, z_val, steps_eval, s, weak=weak), val, judge)
                              for s in (1.5, 2.0)}
    result["autoguidance"]["weak_step"] = snaps[0]


def rescore(variant: str, artifacts: Path) -> None:
    """Measure a finished run again from its kept snapshots (after a change to a reader), in place."""
    path = OUT / f"{variant}.json"
    result = json.loads(path.read_text())
    preset = get_preset("course")
    clip = ensure_clip(artifacts, preset, progress=False)
    judge = ensure_judge(artifacts, preset, progress=False)
    cfg = preset.decoder
    for key, value in VARIANTS[variant].items():
        if not key.startswith("_"):
            cfg = set_field(cfg, key, value)
    seed_everything(cfg.train.seed)
    model = Decoder(cfg, clip.embed_dim, clip.width)
    snaps = tuple(p["step"] for p in result["curve"])
    step_s = result["curve"][-1]["cpu_minutes"] * 60 / snaps[-1]
    cache = embedding_cache(clip, ShapesWorld("train", preset.world), cfg.n_train_images, artifacts / "cache")
    measure(result, model, cfg, int(cache["text_mask"].shape[1]), OUT / "runs" / variant, snaps, step_s, clip, judge,
            preset, artifacts, n_curve=result["eval"].get("n_curve", 128), n_final=result["final"]["n"],
            steps_eval=result["eval"]["steps"], guidance_scale=result["eval"]["guidance"])
    result["rescored"] = time.strftime("%Y-%m-%d %H:%M")
    path.write_text(json.dumps(result, indent=1))


def table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    print(f"{'variant':12s} {'budget':>6s} {'steps':>6s} {'img/s':>6s} | {'val judge':>9s} {'strict':>6s} {'joint':>6s} | "
          f"{'held judge':>10s} {'strict':>6s} | autoguid. s=2 judge/strict")
    for r in rows:
        v, h, a = r["final"]["val"], r["final"]["heldout"], r["autoguidance"]["s=2.0"]
        print(f"{r['variant']:12s} {r['budget_s']:6.0f} {r['steps']:6d} {r['images_per_s']:6.0f} | {v['judge_shape']:9.3f} "
              f"{v['strict_shape']:6.3f} {v['judge_joint']:6.3f} | {h['judge_shape']:10.3f} {h['strict_shape']:6.3f} | "
              f"{a['judge_shape']:.3f} / {a['strict_shape']:.3f}")


def collect() -> None:
    """Gather every result in build/recipes/ into data/decoder_recipes.json (notebook 05 reads it)."""
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no results in {OUT}: run some variants first (see --list)")
    COLLECTED.write_text(json.dumps({"made_by": "python benchmarks/decoder_recipes.py --variant NAME --seconds S; "
                                                "then --collect", "runs": runs}, indent=1) + "\n")
    print(f"wrote {len(runs)} runs to {COLLECTED}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget in wall-clock seconds on this machine")
    ap.add_argument("--points", type=float, nargs="+", default=(0.25, 0.5, 0.75, 1.0), help="learning-curve points (fractions)")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "build" / "exp", help="where CLIP and the judge live")
    ap.add_argument("--n-curve", type=int, default=128, help="val scenes per learning-curve point")
    ap.add_argument("--n-final", type=int, default=256, help="val and held-out scenes for the final scores")
    ap.add_argument("--eval-steps", type=int, default=25, help="DDIM steps when decoding")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale when decoding")
    ap.add_argument("--tag", default="", help="suffix of the result file (e.g. a second budget)")
    ap.add_argument("--list", action="store_true", help="list the variants")
    ap.add_argument("--table", action="store_true", help="print the table of every result in build/recipes/")
    ap.add_argument("--collect", action="store_true", help="gather every result into data/decoder_recipes.json")
    ap.add_argument("--rescore", action="store_true", help="measure --variant's finished run again from its snapshots")
    args = ap.parse_args()
    if args.list:
        for name, ov in VARIANTS.items():
            print(f"{name:12s} {ov}")
        return
    if args.table:
        return table()
    if args.collect:
        return collect()
    if not args.variant:
        ap.error("--variant is required (see --list)")
    if args.rescore:
        return rescore(args.variant, args.artifacts)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run(args.variant, args.seconds, tuple(args.points), args.artifacts, args.n_curve, args.n_final,
                 args.eval_steps, args.guidance_scale)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    name = args.variant + (f"-{args.tag}" if args.tag else "")
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("variant", "steps", "images_per_s", "final", "autoguidance", "total_s")}, indent=1))


if __name__ == "__main__":
    main()
