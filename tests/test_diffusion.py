"""The diffusion maths, checked against a model whose optimum is known in closed form.

For Gaussian data x0 ~ N(mu, s^2 I), E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) * (x_t - sqrt(ab) mu),
so the ideal denoiser is exact and every sampler must reproduce the data distribution.
"""
import pytest
import torch

from unclip_lite.diffusion import OBJECTIVES, GaussianDiffusion, guided, make_betas

MU, SD = 0.3, 0.5


def ideal_model(diffusion: GaussianDiffusion, full: GaussianDiffusion):
    """The exact denoiser for N(MU, SD^2), answering in `diffusion`'s objective."""
    def fn(x, t):
        ab = full.alphas_cumprod[t.long()].float().view(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x_start = MU + a * SD ** 2 / (ab * SD ** 2 + 1 - ab) * (x - a * MU)
        eps = (x - a * x_start) / s
        return {"eps": eps, "x0": x_start, "v": a * eps - s * x_start}[diffusion.objective]
    return fn


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_are_valid(schedule):
    betas = make_betas(schedule)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas < 1).all()
    ab = torch.cumprod(1 - betas, 0)
    assert ab[0] > 0.999 and ab[-1] < 1e-4 and (ab[1:] < ab[:-1]).all()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("quadratic")


def test_q_sample_at_t0_returns_x0():
    d = GaussianDiffusion.from_schedule("cosine")
    x_start = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(d.q_sample(x_start, t, torch.zeros_like(x_start)), x_start, atol=1e-4)
    assert (d.q_sample(x_start, t) - x_start).abs().max() < 0.05  # sqrt(1 - abar_0) = 0.006 times the noise
    far = d.q_sample(x_start, torch.full((4,), 999))
    assert abs(float(far.std()) - 1) < 0.1  # pure noise at the end


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predict_inverts_the_target(objective):
    d = GaussianDiffusion.from_schedule("cosine", objective=objective, clip_x_start=None)
    g = torch.Generator().manual_seed(0)
    x_start, noise = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    x0_hat, eps_hat = d.predict(d.target(x_start, noise, t), d.q_sample(x_start, t, noise), t)
    assert torch.allclose(x0_hat, x_start, atol=2e-3) and torch.allclose(eps_hat[1:], noise[1:], atol=2e-3)


def test_respaced_schedules_agree_with_the_full_one():
    full = GaussianDiffusion.from_schedule("cosine")
    for n in (250, 50, 25):
        r = full.respaced(n)
        assert r.num_steps == n and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
        assert torch.allclose(r.alphas_cumprod, full.alphas_cumprod[r.timestep_map], rtol=1e-10)
    one = full.respaced(1)  # a single step must start from pure noise, not from t = 0
    assert one.num_steps == 1 and one.timestep_map.tolist() == [999]
    same = full.respaced(1000)
    assert torch.allclose(same.betas, full.betas) and torch.equal(same.timestep_map, full.timestep_map)
    with pytest.raises(ValueError, match="respace"):
        full.respaced(2000)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_loss_is_zero_for_the_exact_model_only(objective):
    d = GaussianDiffusion.from_schedule("cosine", objective=objective, clip_x_start=None)
    g = torch.Generator().manual_seed(0)
    x_start, noise = 0.5 + torch.randn(64, 8, generator=g) * 0.01, torch.randn(64, 8, generator=g)
    t = torch.randint(1, 1000, (64,), generator=g)

    def perfect(x, tt):  # knows the noise: the target exactly
        return d.target(x_start, noise, t)
    assert float(d.training_loss(perfect, x_start, t, noise).max()) < 1e-10
    assert float(d.training_loss(lambda x, tt: torch.zeros_like(x), x_start, t, noise).mean()) > 0.1


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("eta", [None, 0.0, 1.0])
def test_samplers_reproduce_the_data_distribution(objective, eta):
    full = GaussianDiffusion.from_schedule("cosine", objective=objective, clip_x_start=None)
    d = full.respaced(100)
    x = d.sample(ideal_model(d, full), (4096, 4), eta=eta, generator=torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - SD) < 0.02


def test_ddim_at_eta_zero_is_deterministic():
    full = GaussianDiffusion.from_schedule("cosine", clip_x_start=None)
    d = full.respaced(25)
    x_t = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    a = d.sample(ideal_model(d, full), x_t, eta=0.0, generator=torch.Generator().manual_seed(2))
    b = d.sample(ideal_model(d, full), x_t, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = d.sample(ideal_model(d, full), x_t, eta=1.0, generator=torch.Generator().manual_seed(2))
    e = d.sample(ideal_model(d, full), x_t, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(c, e)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_inversion_then_sampling_reconstructs_the_input(objective):
    full = GaussianDiffusion.from_schedule("cosine", objective=objective, clip_x_start=None)
    d = full.respaced(250)
    model = ideal_model(d, full)
    x_start = MU + SD * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    x_T = d.ddim_invert(model, x_start)
    assert abs(float(x_T.std()) - 1) < 0.1  # it lands on (approximately) standard noise
    back = d.sample(model, x_T, eta=0.0)
    assert (back - x_start).abs().max() < 0.02, float((back - x_start).abs().max())


def test_progressive_sampler_yields_every_step():
    full = GaussianDiffusion.from_schedule("cosine", clip_x_start=None)
    d = full.respaced(10)
    steps = list(d.sample_progressive(ideal_model(d, full), (2, 3), generator=torch.Generator().manual_seed(0)))
    assert [s["t"] for s in steps] == list(range(9, -1, -1)) and [s["step"] for s in steps] == list(range(10))
    assert all(s["x"].shape == (2, 3) and s["x_start"].shape == (2, 3) for s in steps)


def test_guidance_combines_conditional_and_unconditional_outputs():
    calls = []

    def model(x, t, drop):
        calls.append(len(x))
        return torch.where(drop.view(-1, 1), torch.full_like(x, 1.0), torch.full_like(x, 3.0))
    x, t = torch.zeros(4, 2), torch.zeros(4)
    assert torch.equal(guided(model, 1.0)(x, t), torch.full((4, 2), 3.0)) and calls == [4]
    out = guided(model, 3.0)(x, t)  # 1 + 3 * (3 - 1)
    assert torch.equal(out, torch.full((4, 2), 7.0)) and calls[-1] == 8  # one batch of 2B


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weighting_is_the_same_for_every_objective(objective):
    """Measured as an error on x0, the weight is min(SNR, gamma) whatever the network predicts."""
    d = GaussianDiffusion.from_schedule("cosine", objective=objective, clip_x_start=None)
    g = torch.Generator().manual_seed(0)
    x_start, noise = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    t = torch.tensor([5, 100, 400, 700, 990])
    x_t = d.q_sample(x_start, t, noise)
    x0_wrong = x_start + 0.1  # the model's x0 estimate, off by a constant
    eps_wrong = (x_t - d.sqrt_ab[t].float()[:, None] * x0_wrong) / d.sqrt_1mab[t].float()[:, None]
    a, s = d.sqrt_ab[t].float()[:, None], d.sqrt_1mab[t].float()[:, None]
    out = {"eps": eps_wrong, "x0": x0_wrong, "v": a * eps_wrong - s * x0_wrong}[objective]
    loss = d.training_loss(lambda x, tt: out, x_start, t, noise, min_snr_gamma=5.0)
    expected = 0.01 * d.snr(t).clamp(max=5.0)
    assert torch.allclose(loss, expected, rtol=1e-3)


def test_training_timestep_sampling():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    uniform = d.sample_t(64, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    strat = d.sample_t(100, g, "stratified")
    assert sorted((strat // 10).tolist()) == list(range(100))  # exactly one t in each slice of 10 steps
    lsnr = d.sample_t(4000, g, "logsnr", (1.0, 0.5))
    log_snr = torch.log(d.snr(lsnr))
    assert abs(float(log_snr.mean()) - 1.0) < 0.1 and 0.4 < float(log_snr.std()) < 0.6
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        d.sample_t(4, g, "lognormal")
