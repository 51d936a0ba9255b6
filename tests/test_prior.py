import numpy as np
import pytest
import torch

from unclip_lite import checkpoint as ckpt
from unclip_lite.clip import ensure_clip
from unclip_lite.clip_model import load_clip
from unclip_lite.config import ARPriorConfig, PriorConfig, get_preset
from unclip_lite.prior_nets import ARPrior, dequantise, DiffusionPrior, quantise, top_half
from unclip_lite.transformer import CausalTransformer
from unclip_lite.prior import ensure_prior, load_prior, PriorBatches
from unclip_lite.stats import components_for, pca


def _text(b=3, length=6, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, 4:] = False  # right padding, as CLIP's caption states come
    return torch.randn(b, length, width, generator=g), mask


@torch.no_grad()
def test_causal_transformer_is_causal_ignores_padding_and_caches_exactly():
    torch.manual_seed(0)
    net = CausalTransformer(width=16, layers=2, heads=2, max_len=10).eval()
    x = torch.randn(2, 8, 16)
    keep = torch.ones(2, 8, dtype=torch.bool)
    base = net(x, keep)
    later = x.clone()
    later[:, 5] += torch.randn(2, 16)  # change position 5: positions 0..4 must not see it, 5.. must
    out = net(later, keep)
    assert torch.allclose(out[:, :5], base[:, :5], atol=1e-6)
    assert not torch.allclose(out[:, 5:], base[:, 5:], atol=1e-3)
    keep_pad = keep.clone()
    keep_pad[:, 2] = False  # a padded key is read by nobody but itself
    padded = x.clone()
    padded[:, 2] = 100.0
    a, b = net(x, keep_pad), net(padded, keep_pad)
    assert torch.allclose(a[:, 3:], b[:, 3:], atol=1e-5) and torch.isfinite(b).all()
    cache = {}  # incremental decoding with the key/value cache equals the full pass
    steps = [net(x[:, :5], keep[:, :5], cache)] + [net(x[:, i:i + 1], keep[:, i:i + 1], cache) for i in range(5, 8)]
    assert torch.allclose(torch.cat(steps, 1), base, atol=1e-5)


@torch.no_grad()
def test_diffusion_prior_reads_the_caption_and_dropping_it_cuts_it():
    torch.manual_seed(0)
    model = DiffusionPrior(PriorConfig(width=32, layers=2, heads=2), z_dim=16, text_width=24, text_length=6).eval()
    states, mask = _text()
    x, t, z_t = torch.randn(3, 16), torch.tensor([10.0, 500.0, 990.0]), torch.randn(3, 16)
    base = model(x, t, z_t, states, mask)
    assert base.shape == (3, 16)
    other_states = states + torch.randn(states.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(base, model(x, t, z_t, other_states, mask), atol=1e-4)  # the tokens matter
    assert not torch.allclose(base, model(x, t, -z_t, states, mask), atol=1e-4)  # z_t matters
    assert not torch.allclose(base, model(x, t + 100, z_t, states, mask), atol=1e-4)  # t matters
    drop = torch.ones(3, dtype=torch.bool)
    dropped = model(x, t, z_t, states, mask, drop)
    assert torch.allclose(dropped, model(x, t, -z_t, other_states, mask, drop), atol=1e-6)  # caption ignored
    part = torch.tensor([True, False, False])  # dropping one row leaves the others alone
    mixed = model(x, t, z_t, states, mask, part)
    assert torch.allclose(mixed[0], dropped[0], atol=1e-6) and torch.allclose(mixed[1:], base[1:], atol=1e-6)


def test_conditioning_is_dropped_at_the_configured_rate():
    cache = {"image_embed": torch.randn(50, 16), "text_embed": torch.randn(50, 16), "caption_index": torch.arange(50) % 5,
             "text_states": torch.randn(5, 6, 24).to(torch.bfloat16), "text_mask": torch.ones(5, 6, dtype=torch.bool)}
    batches = PriorBatches(cache, batch_size=1000, seed=0, p_drop_text=0.1)
    rate = torch.cat([batches(s)["drop"] for s in range(20)]).float().mean()
    assert abs(float(rate) - 0.1) < 0.01  # 20,000 draws: the standard error is 0.002
    a, b = batches(3), batches(3)
    assert all(torch.equal(a[k], b[k]) for k in a)  # a pure function of the step


def test_pca_keeps_at_least_the_asked_variance_and_no_more_components_than_needed():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 32, generator=g) * torch.logspace(0, -2, 32)  # a decaying spectrum
    fit = {k: v.float() for k, v in pca(z).items()}  # what the AR prior fits
    assert torch.allclose(fit["explained"].sum(), torch.tensor(1.0), atol=1e-5)
    assert (fit["explained"][:-1] >= fit["explained"][1:] - 1e-7).all()
    for want in (0.9, 0.99, 0.999):
        k = components_for(fit["explained"], want)
        assert float(fit["explained"][:k].sum()) >= want - 1e-6
        assert float(fit["explained"][:k - 1].sum()) < want
        coef = (z - fit["mean"]) @ fit["components"][:k].T  # the reconstruction loses what is left
        lost = ((coef @ fit["components"][:k] + fit["mean"] - z) ** 2).sum() / ((z - fit["mean"]) ** 2).sum()
        assert float(lost) <= 1 - want + 1e-5


def test_quantise_round_trip_error_is_at_most_half_a_level():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(5000, 7, generator=g) * torch.arange(1, 8)
    lo, hi = c.min(0).values, c.max(0).values
    for buckets in (4, 64, 1024):
        tokens = quantise(c, lo, hi, buckets)
        assert tokens.min() >= 0 and tokens.max() <= buckets - 1
        err = (dequantise(tokens, lo, hi, buckets) - c).abs()
        assert (err <= (hi - lo) / (2 * buckets) + 1e-5).all()
    # outside the training range a value goes to the end level
    assert quantise(hi + 10, lo, hi, 16).eq(15).all() and quantise(lo - 10, lo, hi, 16).eq(0).all()


def test_top_half_keeps_the_levels_at_and_above_the_median():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    kept = top_half(p)
    assert torch.allclose(kept.sum(1), torch.ones(3))
    assert torch.allclose(kept[0], torch.tensor([0.0, 0.0, 0.3, 0.4]) / 0.7)
    assert torch.allclose(kept[1], p[1])  # the median level is the first: nothing is cut
    assert torch.allclose(kept[2], torch.tensor([0.0, 0.0, 0.5, 0.5]))


@torch.no_grad()
def test_ar_prior_logits_are_causal_in_the_z_tokens():
    torch.manual_seed(0)
    model = ARPrior(ARPriorConfig(buckets=8, dot_buckets=4, width=32, layers=2, heads=2), z_dim=16, text_width=24,
                    text_length=6, k=5).eval()
    states, mask = _text()
    dot, z_tokens = torch.tensor([0, 1, 3]), torch.randint(0, 8, (3, 5), generator=torch.Generator().manual_seed(0))
    d, z = model(states, mask, dot, z_tokens)
    assert d.shape == (3, 4) and z.shape == (3, 5, 8)
    changed = z_tokens.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 8  # token 2 may inform the logits of tokens 3 and 4 only
    d2, z2 = model(states, mask, dot, changed)
    assert torch.allclose(d, d2) and torch.allclose(z[:, :3], z2[:, :3], atol=1e-6)
    assert not torch.allclose(z[:, 3:], z2[:, 3:], atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke CLIP and both smoke priors, trained once for the tests below (seconds)."""
    root = tmp_path_factory.mktemp("prior")
    smoke = get_preset("smoke")
    clip = ensure_clip(root, smoke, progress=False)
    return root, smoke, clip, {kind: ensure_prior(root, smoke, clip, kind, progress=False) for kind in ("diffusion", "ar")}


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_sampling_is_unit_norm_batched_and_deterministic_per_seed(trained, kind):
    _, _, _, priors = trained
    prior = priors[kind]
    captions = ["a red circle", "a big blue star on stripes", "a red circle"]
    z = prior.sample(captions, seed=0)
    assert z.shape == (3, prior.clip.embed_dim) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(z, prior.sample(captions, seed=0))
    assert not torch.equal(z, prior.sample(captions, seed=1))
    assert not torch.equal(z[0], z[2])  # the same caption twice gets two draws
    assert torch.allclose(prior.sample(captions, seed=0, batch_size=2), z, atol=1e-5)  # batching changes nothing


def test_artifacts_reload_without_retraining_and_hold_their_metrics(trained):
    root, smoke, clip, priors = trained
    for kind, prior in priors.items():
        folder = root / f"prior_{kind}"
        assert ckpt.stage_exists(folder) and not (folder / "train_state.safetensors").exists()
        m = prior.metrics
        assert m["train_flops_per_sample"] > 0 and m["flops_per_sample"] > 0 and m["train"]["wall_s"] > 0
        for split in ("val", "heldout"):
            assert len(m["eval"][split][m["eval"]["default"]]["nearest_hit"]) == m["eval"][split]["n"]
        reloaded = ensure_prior(root, smoke, clip, kind, progress=False)  # loads, does not retrain
        assert reloaded.metrics["created"] == m["created"]
        assert torch.equal(reloaded.sample(["a red circle"], seed=3), prior.sample(["a red circle"], seed=3))
    assert priors["ar"].metrics["quantisation"]["pca_only"]["variance_lost"] <= 1 - smoke.ar_prior.variance_kept + 1e-6


def test_a_prior_is_tied_to_its_clip(trained):
    root, smoke, _, _ = trained
    clip2 = load_clip(smoke.clip.model)  # another CLIP: the same architecture, other (untrained) weights
    with pytest.raises(ckpt.ConfigMismatchError, match="clip_fingerprint"):
        load_prior(root / "prior_diffusion", smoke, clip2, "diffusion")
    with pytest.raises(ValueError, match="unknown prior kind"):
        ensure_prior(root, smoke, clip2, kind="gan")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_samples():
    from unclip_lite.stats import bootstrap_ci
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.8, rng.random(5000) < 0.8
    m, lo, hi = bootstrap_ci(small)
    assert lo <= m <= hi and m == small.mean()
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4 and lo2 <= 0.8 <= hi2  # sqrt(100) = 10x more data: ~10x narrower
    assert bootstrap_ci(np.ones(30)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1)


def test_verdict_claims_only_what_the_intervals_support():
    from unclip_lite.studies.stages import verdict
    clear, none = (0.15, 0.11, 0.19), (0.01, -0.02, 0.04)
    assert verdict(clear, clear, 0.9, 44.0).startswith("diffusion wins on fidelity per unit of training compute")
    assert "no fidelity difference is detectable" in verdict(none, none, 0.9, 44.0)
    assert "disagree" in verdict(clear, (-0.03, -0.05, -0.01), 0.9, 44.0)
    assert verdict(clear, clear, 1.5, 44.0).startswith("No winner per unit of compute")  # better but costlier
