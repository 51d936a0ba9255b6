"""Gaussian diffusion, independent of any network: shared by the prior, the decoder and the upsampler.

The model is passed in as a function ``model_fn(x_t, t) -> output`` where ``t`` is the timestep
on the *original* 1000-step scale (a float tensor), so a model trained on the full schedule can
be sampled on a respaced one. What the output means is the diffusion's `objective`:

- ``"eps"``: the noise that was added (DDPM, Ho et al. 2020);
- ``"x0"``: the clean sample x_start (the paper's diffusion prior predicts z_i directly);
- ``"v"``: v = sqrt(abar) * eps - sqrt(1 - abar) * x_start (Salimans & Ho 2022), which keeps the
  target's scale constant over t and trains faster at few steps.

Notation: abar_t = prod_{s<=t} (1 - beta_s); q(x_t | x_start) = N(sqrt(abar_t) x_start, (1 - abar_t) I).
The clean sample is called ``x_start`` in code (the paper's x_0); the objective keeps its short name
``"x0"`` because it is stored in every artifact's config.
Schedules: "cosine" (Nichol & Dhariwal 2021) and "linear" (Ho et al. 2020).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

OBJECTIVES = ("eps", "x0", "v")
SCHEDULES = ("cosine", "linear")


def make_betas(schedule: str, steps: int = 1000) -> torch.Tensor:
    """The beta schedule, float64 (steps,)."""
    if schedule == "linear":
        scale = 1000 / steps  # keeps the schedule's end points when steps != 1000
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] as float32, shaped to broadcast over a batch of `ndim`-dimensional samples."""
    return values.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """The forward process, the training loss, and DDPM / DDIM sampling and inversion.

    `timestep_map[i]` is the original timestep of this (possibly respaced) process's step i; it
    is what the model is told. Build one with `GaussianDiffusion.from_schedule` and respace it
    with `respaced(n)`.
    """

    def __init__(self, betas: torch.Tensor, objective: str = "v", timestep_map: torch.Tensor | None = None,
                 clip_x_start: float | None = 1.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        self.betas = betas.double()
        self.objective = objective
        self.clip_x_start = clip_x_start
        self.num_steps = len(betas)
        self.timestep_map = timestep_map if timestep_map is not None else torch.arange(self.num_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_ab = self.alphas_cumprod.sqrt()
        self.sqrt_1mab = (1 - self.alphas_cumprod).sqrt()
        # posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var)
        self.posterior_var = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_logvar = torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        self.posterior_c0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_ct = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_schedule(cls, schedule: str = "cosine", steps: int = 1000, objective: str = "v",
                      clip_x_start: float | None = 1.0) -> "GaussianDiffusion":
        return cls(make_betas(schedule, steps), objective, clip_x_start=clip_x_start)

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same process on `steps` evenly spaced timesteps (e.g. 1000 -> 250, 50 or 25).

        The kept timesteps keep their abar exactly; the betas between them are recomputed as
        1 - abar_t / abar_{t'} (Nichol & Dhariwal 2021, improved-diffusion's respacing).
        """
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"cannot respace {self.num_steps} steps to {steps}")
        # from the last step down, so that even one step starts at pure noise (t = T - 1)
        keep = torch.linspace(self.num_steps - 1, 0, steps).round().long().unique()
        abar = self.alphas_cumprod[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1 - abar / prev, self.objective, self.timestep_map[keep], self.clip_x_start)

    # -- the forward process and the loss -------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return _gather(self.sqrt_ab, t, x_start.ndim) * x_start + _gather(self.sqrt_1mab, t, x_start.ndim) * noise

    def target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output for (x_start, noise, t) under this objective."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x_start
        return _gather(self.sqrt_ab, t, x_start.ndim) * noise - _gather(self.sqrt_1mab, t, x_start.ndim) * x_start

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is told: step t's original timestep, as float."""
        return self.timestep_map.to(t.device)[t].float()

    def sample_t(self, n: int, generator: torch.Generator | None = None, method: str = "uniform",
                 logsnr: tuple[float, float] = (0.0, 2.0)) -> torch.Tensor:
        """Training timesteps (n,) long.

        - "uniform": t ~ U{0, ..., T-1} (DDPM);
        - "stratified": one t from each of n equal slices of [0, T), in random order: the same
          distribution with less variance across a batch;
        - "logsnr": log(SNR_t) ~ N(mean, std), mapped to the nearest step (the EDM idea of
          training where the noise level matters, Karras et al. 2022, in this discrete schedule).
        """
        if method == "uniform":
            return torch.randint(0, self.num_steps, (n,), generator=generator)
        if method == "stratified":
            u = (torch.arange(n) + torch.rand(n, generator=generator)) / n
            t = (u * self.num_steps).long().clamp_max(self.num_steps - 1)
            return t[torch.randperm(n, generator=generator)]
        if method == "logsnr":
            mean, std = logsnr
            target = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
            table = -(self.alphas_cumprod / (1 - self.alphas_cumprod)).log()  # -log SNR, increasing in t
            return torch.searchsorted(table, -target).clamp_max(self.num_steps - 1)
        raise ValueError(f"unknown timestep sampling {method!r}; choose 'uniform', 'stratified' or 'logsnr'")

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at steps t, float32 (B,)."""
        ab = self.alphas_cumprod.to(t.device)[t]
        return (ab / (1 - ab)).float()

    def training_loss(self, model_fn: Callable, x_start: torch.Tensor, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      min_snr_gamma: float | None = None) -> torch.Tensor:
        """Per-sample MSE between the model's output and the objective's target, shape (B,).

        t is drawn uniformly when not given. The mean over the batch is the usual loss. With
        `min_snr_gamma` each sample is weighted so that, measured as an error on x_start, its weight is
        min(SNR_t, gamma) (Hang et al. 2023, "Min-SNR weighting"): the nearly clean steps, which
        are easy and dominate the gradient otherwise, stop crowding out the rest.
        """
        b = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.num_steps, (b,), generator=generator).to(x_start.device)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator).to(x_start.device)
        out = model_fn(self.q_sample(x_start, t, noise), self.model_t(t))
        loss = F.mse_loss(out.float(), self.target(x_start, noise, t).float(), reduction="none").flatten(1).mean(1)
        if min_snr_gamma is not None:
            snr = self.snr(t)
            # this objective's loss is (x_start error) * {eps: SNR, x0: 1, v: SNR + 1}
            scale = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.objective]
            loss = loss * snr.clamp(max=min_snr_gamma) / scale
        return loss

    def batch_loss(self, forward: Callable, min_snr_gamma: float | None = None) -> Callable:
        """`loss_fn(model, batch)` for the training loop: the batch's mean `training_loss`, where
        `forward(model, batch, x_t, t)` runs the network on the batch's own conditioning and the
        batch carries "x_start", "t" and "noise" (drawn by the stage's batch function)."""
        def loss_fn(model, batch: dict) -> torch.Tensor:
            return self.training_loss(lambda x, t: forward(model, batch, x, t), batch["x_start"], batch["t"],
                                      batch["noise"], min_snr_gamma=min_snr_gamma).mean()
        return loss_fn

    # -- reading the model ---------------------------------------------------------------------
    def predict(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_start, eps) implied by a model output at x_t; x_start is clipped to [-clip_x_start, clip_x_start]
        (when the diffusion has a clip range and `clip`), and eps is made consistent with it."""
        output = output.float()
        a, s = _gather(self.sqrt_ab, t, x_t.ndim), _gather(self.sqrt_1mab, t, x_t.ndim)
        if self.objective == "eps":
            x_start = (x_t - s * output) / a
        elif self.objective == "x0":
            x_start = output
        else:
            x_start = a * x_t - s * output
        if self.clip_x_start is not None and clip:
            x_start = x_start.clamp(-self.clip_x_start, self.clip_x_start)
        eps = (x_t - a * x_start) / s
        return x_start, eps

    # -- sampling ------------------------------------------------------------------------------
    def sample_progressive(self, model_fn: Callable, shape_or_noise, eta: float | None = 0.0,
                           generator: torch.Generator | None = None, device: str | torch.device = "cpu"
                           ) -> Iterator[dict]:
        """Yield {"step", "t", "x", "x_start"} after every denoising step, from x_T to x_0.

        eta=None runs ancestral DDPM (posterior mean plus its variance); eta=0 is deterministic
        DDIM; 0 < eta <= 1 interpolates (eta=1 has DDPM's marginals). `shape_or_noise` is a
        shape (noise is drawn with `generator`) or x_T itself (for example from `ddim_invert`).
        """
        if isinstance(shape_or_noise, torch.Tensor):
            x = shape_or_noise.float().to(device)
        else:
            x = torch.randn(tuple(shape_or_noise), generator=generator).to(device)
        for step, i in enumerate(reversed(range(self.num_steps))):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x_start, eps = self.predict(model_fn(x, self.model_t(t)), x, t)
            noise = torch.randn(x.shape, generator=generator).to(x.device) if i > 0 else torch.zeros_like(x)
            if eta is None:  # DDPM: sample the posterior q(x_{t-1} | x_t, x_start)
                mean = _gather(self.posterior_c0, t, x.ndim) * x_start + _gather(self.posterior_ct, t, x.ndim) * x
                x = mean + (0.5 * _gather(self.posterior_logvar, t, x.ndim)).exp() * noise
            else:  # DDIM (Song et al. 2021, eq. 12)
                ab, ab_prev = _gather(self.alphas_cumprod, t, x.ndim), _gather(self.alphas_cumprod_prev, t, x.ndim)
                sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                x = ab_prev.sqrt() * x_start + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * noise
            yield {"step": step, "t": i, "x": x, "x_start": x_start}

    def sample(self, model_fn: Callable, shape_or_noise, eta: float | None = 0.0,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """x_0 from the full reverse chain (see `sample_progressive`)."""
        out = None
        for out in self.sample_progressive(model_fn, shape_or_noise, eta, generator, device):
            pass
        return out["x"]

    def ddim_invert(self, model_fn: Callable, x_start: torch.Tensor) -> torch.Tensor:
        """Run deterministic DDIM backwards: x_0 -> x_T under the model (and its condition).

        Sampling step i maps x at noise level i to level i-1 with eps read at (x_i, i). Inversion
        step i goes the other way, reading eps at the point it has (level i-1) with the label i,
        and moves along it to level i. Sampling from the result with eta=0 and the same condition
        retraces the path to x_0, up to that one-step lag: small for smooth models and enough
        steps. x_start is not clipped here (clipping is not invertible).
        """
        x = x_start.float()
        ab_cur = 1.0
        for i in range(self.num_steps):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            _, eps = self.predict(model_fn(x, self.model_t(t)), x, t, clip=False)
            x0_hat = (x - (1 - ab_cur) ** 0.5 * eps) / ab_cur ** 0.5
            ab_cur = float(self.alphas_cumprod[i])
            x = ab_cur ** 0.5 * x0_hat + (1 - ab_cur) ** 0.5 * eps
        return x


def guided(model_fn: Callable[..., torch.Tensor], scale: float) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) around a model that takes `drop=...`.

    Returns fn(x_t, t) = out_uncond + scale * (out_cond - out_uncond), evaluated in one batch
    of 2B. `model_fn(x, t, drop)` must run conditioned where drop is False and unconditioned
    (the learned null condition) where it is True. Every objective's output is affine in eps at
    fixed x_t, so combining raw outputs equals guiding eps. scale=1 is plain conditional
    sampling and skips the unconditional half.
    """
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if scale == 1.0:
            return model_fn(x, t, torch.zeros(b, dtype=torch.bool, device=x.device))
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), drop).float()
        cond, uncond = out[:b], out[b:]
        return uncond + scale * (cond - uncond)
    return fn
