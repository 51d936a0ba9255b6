"""The paper's comparisons (notebook 12). Every number is the judge's reading of generated images;
each comes with per-caption (or per-image) values so that intervals can be bootstrapped, and a
difference between two systems is always paired: the same captions, the same seeds."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import group_spreads
from ..judge import TrainedJudge, attribute_accuracy, attribute_hits, caption_hits
from ..clip import no_caption
from ..pipeline import check_sampling
from ..runtime import check_arg, stage_seed
from ..shapes import ShapesWorld, parse_caption
from .. import stats
from ..config import WorldConfig
from ..data import rendered, single_object
from ..stage import without_images
from ..stats import frechet_ci, pca_basis


def sample_system(pipe, decoder, captions: list[str], condition: str = "prior", prior: str = "diffusion",
                  guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                  use_caption: bool = True) -> torch.Tensor:
    """32 px images from `decoder` for each caption, conditioned on:

    - "prior": z_i sampled by `pipe`'s `prior` (unCLIP);
    - "text": the CLIP text embedding z_t, fed zero-shot in place of z_i (the paper's ablation);
    - "caption": no z_i at all (the learned null): the caption alone. This is how the
      caption-only (GLIDE-like) baseline always runs, and the ablation for the unCLIP decoder.
    The caption also goes to the decoder unless `use_caption=False`. Noise streams follow
    `pipeline.stage_seed`, so the same seed gives every system the same x_T.
    """
    check_sampling(seed=seed, steps=steps, guidance_scale=guidance_scale)
    if condition == "prior":
        z = pipe.priors[prior].sample(captions, seed=stage_seed(seed, "prior"))
    elif condition == "text":
        z = pipe.clip.encode_texts(captions)
    elif condition == "caption":
        z = None
    else:
        raise ValueError(f"condition must be 'prior', 'text' or 'caption', got {condition!r}")
    return decode_z(pipe, decoder, z, captions, guidance_scale=guidance_scale, steps=steps, seed=seed, use_caption=use_caption)


def decode_z(pipe, decoder, z: torch.Tensor | None, captions: list[str], guidance_scale: float | None = None,
             steps: int | None = None, seed: int = 0, use_caption: bool = True) -> torch.Tensor:
    """Decode given z_i (N, D) (or None) with the captions (or none), from the seed's x_T."""
    n = len(captions)
    states, mask = pipe.caption_states(captions) if use_caption else no_caption(pipe.clip, n)
    return decoder.decode(z, states, mask, seed=seed, steps=steps, guidance_scale=guidance_scale)


def diversity(images: torch.Tensor, judge: TrainedJudge, k: int, shapes_named: list[str] | None = None) -> dict:
    """Spread across the k samples of each caption (images grouped as N/k captions x k samples):

    - "feature": mean pairwise distance of the judge's features (everything the judge sees);
    - "position_px": RMS distance of the judged object centres from their mean, in 32 px pixels;
    - "rotation_deg": circular std of the rotation (`manipulate.estimate_rotation`), over the
      captions whose named shape has one (`shapes_named`, per caption), from the samples the
      judge reads as that shape (another shape's angle lives on another period).
    Each is a list with one value per caption (NaN where undefined), for bootstrap intervals.
    """
    if len(images) % k:
        raise ValueError(f"{len(images)} images do not split into groups of k = {k}")
    out = judge.outputs(images)
    feats = out["features"].view(-1, k, out["features"].shape[-1])
    pair = torch.cdist(feats, feats)  # (G, k, k)
    feature = (pair.sum((1, 2)) / (k * (k - 1))).tolist()
    shapes = list(shapes_named) if shapes_named is not None else ["circle"] * len(feats)  # circle: no rotation
    position, rotation = group_spreads(images, judge.predict(images), k, shapes)
    return {"feature": feature, "position_px": position, "rotation_deg": rotation}


def system_report(images: torch.Tensor, captions: list[str], judge: TrainedJudge, k: int,
                  real_feats: torch.Tensor | None = None, basis=None) -> dict:
    """Per caption (so that a bootstrap resamples captions, not the correlated samples of one):
    fidelity (the share of its k images with every named shape, colour and size right) and
    diversity (see `diversity`); and, given real features and a basis, the Fréchet distance with
    its interval (and the judge features, for `paired_frechet`).
    `captions` has one entry per image (each caption repeated k times in a row)."""
    hits = caption_hits(images, captions, judge)
    parsed = [parse_caption(c) for c in captions[::k]]
    named = [p["objects"][0].get("shape") if p.get("count") == 1 else None for p in parsed]
    fidelity = hits["joint"].float()
    out = {"n_images": len(images), "k": k, "fidelity": fidelity.view(-1, k).mean(1).tolist(),
           **{f"diversity_{key}": v for key, v in diversity(images, judge, k, named).items()}}
    for head in ("shape", "colour", "size"):
        m = hits[head + "_named"]
        out[f"accuracy_{head}"] = float(hits[head][m].float().mean()) if m.any() else float("nan")
    if real_feats is not None and basis is not None:
        out["features"] = judge.features(images)
        out["frechet"] = frechet_ci(out["features"], real_feats, basis, k=k)
    return out


def binding_report(images: torch.Tensor, captions: list[str], judge: TrainedJudge) -> dict:
    """Attribute binding on two-object captions, read per object by the judge's two slots (it has
    a second shape/colour/size head for the right-hand or lower object).

    Per image: "object1" / "object2" (that object's named shape, colour and size right), "both",
    "colours_bound" (each object's colour right), and "swapped": the two colours read, but on the
    wrong objects (the binding failure itself).
    """
    parsed = [parse_caption(c) for c in captions]
    if any(p.get("count") != 2 or len(p.get("objects", [])) != 2 for p in parsed):
        raise ValueError("binding_report needs two-object captions ('a red circle left of a blue square')")
    hits = attribute_hits(images, parsed, judge)
    obj = []
    for suffix in ("", "2"):
        ok = torch.ones(len(images), dtype=torch.bool)
        for head in ("shape", "colour", "size"):
            ok &= hits[head + suffix] | ~hits[head + suffix + "_named"]
        obj.append(ok)
    preds = judge.predict(images)
    swapped = []
    for p, c in zip(preds, parsed):
        named = [o.get("colour") for o in c["objects"]]
        read = [o["colour"] for o in p["objects"]] + [None]
        swapped.append(named[0] != named[1] and read[0] == named[1] and read[1] == named[0])
    colours = (hits["colour"] | ~hits["colour_named"]) & (hits["colour2"] | ~hits["colour2_named"])
    return {"object1": obj[0].float().tolist(), "object2": obj[1].float().tolist(),
            "both": (obj[0] & obj[1]).float().tolist(), "colours_bound": colours.float().tolist(),
            "swapped": [float(s) for s in swapped]}


def pca_probe(pipe, decoder, judge, z_train: torch.Tensor, data: dict, ks=(1, 2, 4, 8, 16, 32, 64),
              guidance_scale: float | None = None, steps: int | None = None, seed: int = 0) -> dict:
    """Decode val z_i reconstructed from their first k principal components (paper §4, Fig. 7).

    The PCA is fitted on the training z_i; each reconstruction is renormalised to the unit sphere
    CLIP's embeddings live on. Decoded with no caption (the caption would name the attributes and
    hide what z_i carries). Returns per k the judge's accuracy per attribute and the share of z_i
    variance the first k components explain, and "full": the accuracy with every component
    (decoded once more unless the last k already keeps them all).
    """
    z = pipe.clip.encode_images(data["images"])
    mean, v = pca_basis(z_train, z_train.shape[1])
    var = ((z_train.double() - mean) @ v).var(0)
    explained = (var.cumsum(0) / var.sum()).tolist()
    coords = (z.double() - mean) @ v
    d = v.shape[1]

    def accuracy_at(k: int) -> dict:
        zk = F.normalize((mean + coords[:, :k] @ v[:, :k].T).float(), dim=-1)
        images = decode_z(pipe, decoder, zk, list(data["captions"]), guidance_scale=guidance_scale, steps=steps, seed=seed,
                          use_caption=False)
        return attribute_accuracy(images, data["attributes"], judge)

    ks = sorted({min(int(k), d) for k in ks})
    out = {"ks": ks, "explained": [explained[k - 1] for k in ks], "accuracy": [accuracy_at(k) for k in ks]}
    out["full"] = out["accuracy"][-1] if ks[-1] == d else accuracy_at(d)
    return out


CHANCE = {"background": 1 / 4, "colour": 1 / 8, "size": 1 / 3, "shape": 1 / 6}  # uniform attributes in ShapesWorld


def components_needed(probe: dict, level: float = 0.9, attributes=("background", "colour", "size", "shape")) -> dict:
    """Per attribute, the fewest principal components at which `pca_probe`'s accuracy has come
    `level` of the way from chance to its accuracy with every component ("full" in the probe),
    so that an attribute decoded near chance does not "arrive" at once. None: never, or when
    the full z_i is itself no better than chance."""
    out = {}
    for a in attributes:
        full, chance = probe["full"].get(a, float("nan")), CHANCE[a]
        if not full > chance:
            out[a] = None
            continue
        out[a] = next((k for k, acc in zip(probe["ks"], probe["accuracy"])
                       if (acc.get(a, 0.0) - chance) >= level * (full - chance)), None)
    return out


def coarse_first(needed: dict, coarse=("background", "colour"), fine=("shape", "size")) -> str:
    """The paper's Fig. 7 direction, from `components_needed`: "reproduced" when every coarse
    attribute arrives with fewer components than every fine one, "reversed" when every fine one
    arrives first, "not resolved" otherwise (ties included)."""
    big = 10 ** 9
    c = [needed[a] if needed[a] is not None else big for a in coarse]
    f = [needed[a] if needed[a] is not None else big for a in fine]
    if max(c) < min(f):
        return "reproduced"
    if max(f) < min(c):
        return "reversed"
    return "not resolved"


# ---------------------------------------------------------------------------------------------
# The claims table: systems sampled once, rows built one way


def one_object_captions(world: WorldConfig, split: str, n: int, cache_dir) -> list[str]:
    """The first `n` one-object captions of a split (so that position and rotation are defined)."""
    return single_object(rendered(ShapesWorld(split, world), 8 * n, cache_dir), n)["captions"]


class Systems:
    """Samples and scores each (system, split, guidance) once. Every system gets the same captions,
    each repeated `k` times, the same seed, and the same Fréchet basis (the first `basis_dims`
    principal components of the val split's real judge features), so that any two are paired."""

    def __init__(self, pipe, judge: TrainedJudge, captions: dict[str, list[str]], k: int,
                 real_feats: dict[str, torch.Tensor], steps: int | None = None, seed: int = 0,
                 basis_dims: int = 16):
        check_arg("k", k, minimum=2, integer=True, none_ok=False)  # a spread needs two samples
        check_sampling(seed=seed, steps=steps)
        self.pipe, self.judge, self.k, self.steps, self.seed = pipe, judge, k, steps, seed
        self.captions = {split: [c for c in caps for _ in range(k)] for split, caps in captions.items()}
        self.real_feats = real_feats
        self.basis = pca_basis(real_feats["val"], basis_dims)
        self.results: dict[tuple, dict] = {}
        self.samples: dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, split: str, decoder, condition: str = "prior", prior: str = "diffusion",
                 guidance_scale: float | None = None) -> dict:
        """`system_report` of `decoder` fed by `condition` ("prior", "caption" or "text") on `split`."""
        key = (name, split, guidance_scale)
        if key not in self.results:
            imgs = sample_system(self.pipe, decoder, self.captions[split], condition=condition, prior=prior,
                                 guidance_scale=guidance_scale, steps=self.steps, seed=self.seed)
            self.samples[key] = imgs
            self.results[key] = system_report(imgs, self.captions[split], self.judge, self.k,
                                              self.real_feats[split], self.basis)
        return self.results[key]

    def frechet_change(self, plus: list[dict], minus: list[dict], split: str = "val") -> tuple[float, float, float]:
        """Σ FD(plus) − Σ FD(minus) with one paired bootstrap over captions (`stats.paired_frechet`)."""
        return stats.paired_frechet([r["features"] for r in plus], [r["features"] for r in minus],
                                    self.real_feats[split], self.basis, self.k)

    def to_json(self) -> dict:
        return {f"{n} | {s} | g={g}": without_images(r) for (n, s, g), r in self.results.items()}


def claim_row(claim: str, split: str, measure: str, a, b, expected: str, diff=None) -> dict:
    """One row of the claims table. `a`, `b`: the two systems' per-item values (summarised with
    bootstrap intervals; their paired difference is judged against the paper's `expected` sign,
    "+" or "-"). With `diff`, `a` and `b` are intervals already computed (the Fréchet rows)."""
    if diff is None:
        diff = stats.paired_difference(a, b)
        a, b = stats.summarise(a), stats.summarise(b)
    return {"claim": claim, "split": split, "measure": measure, "A": a, "B": b, "A - B": diff,
            "expected": expected, "verdict": stats.direction(diff, expected)}


def pca_claim_row(needed: dict) -> dict:
    """Claim 6 as a table row: the components the coarse attributes need (A) against the fine (B)."""
    def pick(reduce, attrs):
        return (float(reduce([needed[a] or np.nan for a in attrs])), np.nan, np.nan)
    return {"claim": "6. PCA: coarse attributes first", "split": "val",
            "measure": "components for 90% of full accuracy", "A": pick(np.nanmax, ("background", "colour")),
            "B": pick(np.nanmin, ("shape", "size")), "A - B": (np.nan,) * 3, "expected": "-",
            "verdict": coarse_first(needed)}


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows reproduce, reverse or do not resolve the paper's direction."""
    verdicts = [r["verdict"].split(":")[0] for r in rows]
    return {v: verdicts.count(v) for v in ("reproduced", "reversed", "not resolved", "not measured")}


def unexpected_verdicts(rows: list[dict], expected: dict[tuple[str, str], set[str]]) -> list[dict]:
    """The rows whose verdict is not one that `expected` allows. A key (claim prefix, measure
    word) applies to a row whose claim starts with the prefix and whose measure contains the word
    ("" matches any measure); the first matching key counts, and a row no key matches is
    reported too (nothing was said about it)."""
    out = []
    for row in rows:
        allowed = next((v for (claim, word), v in expected.items()
                        if row["claim"].startswith(claim) and word in row["measure"]), None)
        verdict = row["verdict"].split(":")[0]
        if allowed is None or verdict not in allowed:
            out.append({"claim": row["claim"], "split": row["split"], "measure": row["measure"],
                        "verdict": row["verdict"], "expected": sorted(allowed) if allowed else "nothing stated"})
    return out
