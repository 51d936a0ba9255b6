"""Statistics the measurements share: bootstrap intervals and paired differences, the verdict
rule for a paired comparison, principal components, the Fréchet distance, and linear probes.

Nothing here knows about images or models: every function takes arrays or tensors of numbers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Intervals and verdicts


def bootstrap_ci(values, stat=np.mean, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): a percentile bootstrap interval of `stat` over per-sample `values`.

    `values` is (N,) (hits as 0/1, cosines, ...) or (N, K) rows resampled together. For a paired
    comparison of two methods on the same samples, pass the per-sample differences: the interval
    of the mean difference excludes 0 only when the data support a difference.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.array([stat(x[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return float(stat(x)), float(low), float(high)


def summarise(values) -> tuple[float, float, float]:
    """Mean with a bootstrap 95% interval, NaNs left out (mean, low, high)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return bootstrap_ci(x) if len(x) else (float("nan"),) * 3


def proportion_ci(rate: float, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """A share `rate` of `n` yes/no outcomes with its Wilson 95% interval (rate, low, high): the
    interval for the small counts of a figure's points (8 pairs, 32 scenes), where a bootstrap of
    so few 0/1 values is coarse and an interval of ±1.96 standard errors can leave [0, 1]."""
    if n <= 0:
        return float(rate), float("nan"), float("nan")
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(rate), float(max(0.0, centre - half)), float(min(1.0, centre + half))


MIN_PAIRS = 10  # fewer pairs than this and a bootstrap interval means nothing: no verdict


def paired_difference(a, b) -> tuple[float, float, float]:
    """Mean of a - b over the pairs where both are defined, with a bootstrap 95% interval; NaN
    (no verdict) with fewer than MIN_PAIRS such pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    return bootstrap_ci(a[keep] - b[keep]) if keep.sum() >= MIN_PAIRS else (float("nan"),) * 3


def direction(diff: tuple[float, float, float], expected: str) -> str:
    """Whether a paired difference (mean, low, high) goes the paper's way: "reproduced" when its
    interval excludes zero on the expected side ("+" or "-"), "reversed" when it excludes zero
    on the other, "not resolved" when it contains zero."""
    if expected not in ("+", "-"):
        raise ValueError(f"expected must be '+' or '-', got {expected!r}")
    if np.isnan(diff[0]):
        return "not measured"
    if diff[1] > 0:
        return "reproduced" if expected == "+" else "reversed"
    if diff[2] < 0:
        return "reproduced" if expected == "-" else "reversed"
    return "not resolved"


# ---------------------------------------------------------------------------------------------
# Principal components


def pca(x: torch.Tensor) -> dict:
    """Principal components of the rows of x (N, D), in float64: {"mean" (D,), "components"
    (min(N, D), D) rows = axes by decreasing variance, "explained" (the share of variance of each)}."""
    x = torch.as_tensor(x).double()
    mean = x.mean(0)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2
    return {"mean": mean, "components": v, "explained": var / var.sum()}


def pca_basis(feats: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), the first `dims` principal directions as columns (D, dims)), float64."""
    fit = pca(feats)
    return fit["mean"], fit["components"][:dims].T


def pca_project(x: torch.Tensor, k: int = 2, fit: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of `x` projected on the top-k principal axes of `fit` (default: of `x` itself)."""
    mean, basis = pca_basis(x if fit is None else fit, k)
    return ((x.double() - mean) @ basis).float()


def components_for(explained: torch.Tensor, variance_kept: float) -> int:
    """The fewest leading components whose explained variance sums to at least `variance_kept`."""
    cum = explained.double().cumsum(0)
    return int(min(len(cum), int((cum < variance_kept - 1e-12).sum()) + 1))


# ---------------------------------------------------------------------------------------------
# The Fréchet distance


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
    Tr (S_a S_b)^{1/2} is computed as the sum of square roots of the eigenvalues of
    S_a^{1/2} S_b S_a^{1/2}, which is symmetric PSD (stable, no complex parts).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 rows")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ s_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def frechet_in_basis(feats: torch.Tensor, real: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The Fréchet distance between generated and real judge features, both projected onto a PCA
    basis of the real features: a few hundred samples cannot estimate a 256-dim covariance, but
    they can estimate a 16-dim one."""
    mean, v = basis
    return frechet_distance(((feats.double() - mean) @ v).numpy(), ((real.double() - mean) @ v).numpy())


def frechet_ci(feats: torch.Tensor, real: torch.Tensor, basis, n_boot: int = 200, seed: int = 0,
               k: int = 1) -> tuple[float, float, float]:
    """`frechet_in_basis` with a bias-corrected bootstrap 95% band, resampling groups of k rows (one
    caption's samples) together: (distance, low, high).

    The plug-in distance is biased upward at small n, and a resample's duplicates add to the bias
    again, so the resamples' own percentiles sit above the point (often entirely). The band is
    their spread shifted by the bootstrap's estimate of that bias (the resamples' mean minus the
    point), so it is centred on the point. To compare two systems use `paired_frechet`, where the
    bias cancels."""
    rng = np.random.default_rng(seed)
    groups = len(feats) // k
    boots = [frechet_in_basis(feats[torch.from_numpy((rng.integers(0, groups, groups)[:, None] * k + np.arange(k)).ravel())],
                              real, basis) for _ in range(n_boot)]
    point = frechet_in_basis(feats, real, basis)
    bias = float(np.mean(boots)) - point
    low, high = np.percentile(boots, [2.5, 97.5]) - bias
    return point, float(max(0.0, low)), float(high)


def paired_frechet(plus: list[torch.Tensor], minus: list[torch.Tensor], real: torch.Tensor, basis, k: int,
                   n_boot: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Σ FD(plus) − Σ FD(minus) (`frechet_in_basis`) with a paired bootstrap 95% interval.

    Every feature set holds the samples of the same captions in the same order (k rows per
    caption); each bootstrap draw resamples captions once for all sets. The plug-in Fréchet
    distance is biased upward at small n (a resample's duplicates bias it further), but the
    bias is shared by sets of the same size, so the difference is what is worth an interval.
    FD(A) − FD(B) is plus=[A], minus=[B]; a change of changes is plus=[A2, B1], minus=[A1, B2].
    """
    sets = list(plus) + list(minus)
    n = len(sets[0])
    if n % k or any(len(f) != n for f in sets):
        raise ValueError(f"every feature set needs the same number of rows, a multiple of k = {k}")
    groups = n // k

    def value(rows):
        fds = [frechet_in_basis(f[rows], real, basis) for f in sets]
        return sum(fds[:len(plus)]) - sum(fds[len(plus):])

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, groups, groups)
        boots.append(value(torch.from_numpy((pick[:, None] * k + np.arange(k)).ravel())))
    low, high = np.percentile(boots, [2.5, 97.5])
    return value(torch.arange(n)), float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Linear probes


def linear_probe(features: torch.Tensor, targets, train_fraction: float = 0.7,
                 ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> float:
    """How much of `targets` a linear map reads off `features`, on held-out rows.

    Ridge regression on standardised features, trained on the first `train_fraction` of the rows
    (the ridge strength picked on the last fifth of those) and scored on the rest. Categorical
    targets (a list of strings) are one-hot encoded and scored by accuracy; numeric targets
    (N,) or (N, K) are scored by R^2 (1: fully readable, 0: no better than the mean).
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    categorical = isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], str)
    if categorical:
        classes = sorted(set(targets))
        y = F.one_hot(torch.tensor([classes.index(t) for t in targets]), len(classes)).double()
    else:
        y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
        y = y[:, None] if y.ndim == 1 else y
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} targets")
    n_train = int(len(x) * train_fraction)
    n_fit = int(n_train * 0.8)
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def fit(rows: slice, ridge: float) -> torch.Tensor:
        xt = x[rows]
        eye = torch.eye(x.shape[1], dtype=x.dtype) * ridge * len(xt)
        eye[-1, -1] = 0  # no penalty on the bias
        return torch.linalg.solve(xt.T @ xt + eye, xt.T @ y[rows])

    def score(w: torch.Tensor, rows: slice) -> float:
        pred, truth = x[rows] @ w, y[rows]
        if categorical:
            return float((pred.argmax(1) == truth.argmax(1)).double().mean())
        resid = ((pred - truth) ** 2).sum(0)
        total = ((truth - truth.mean(0)) ** 2).sum(0).clamp_min(1e-12)
        return float((1 - resid / total).mean())

    best = max(ridges, key=lambda r: score(fit(slice(0, n_fit), r), slice(n_fit, n_train)))
    return score(fit(slice(0, n_train), best), slice(n_train, None))
