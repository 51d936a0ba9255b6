"""Figures for the notebooks: image grids, sample tables and curves (matplotlib)."""
from __future__ import annotations

import numpy as np
import torch

from .images import to_numpy_hwc
from .stats import summarise


def _as_uint8(images) -> np.ndarray:
    """(N, 3, H, W) uint8/float[-1,1] tensors or (N, H, W, 3) uint8 arrays -> (N, H, W, 3) uint8."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.detach().cpu().permute(0, 2, 3, 1).numpy()
        return to_numpy_hwc(images)
    x = np.asarray(images)
    return x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1)


def image_grid(images, titles: list[str] | None = None, ncols: int = 8, scale: float = 1.6,
               title: str | None = None, fontsize: int = 7):
    """Show images in a grid with optional per-image titles; returns the figure."""
    import matplotlib.pyplot as plt

    imgs = _as_uint8(images)
    n = len(imgs)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * (1.25 if titles else 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(imgs[i], interpolation="nearest")
        if titles:
            ax.set_title(titles[i], fontsize=fontsize, wrap=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curve(history: list[list[float]], title: str = "training loss", ax=None):
    """Plot [[step, loss], ...] on a log scale."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    steps, losses = zip(*history)
    ax.plot(steps, losses)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return ax


def accuracy_table(report: dict[str, dict[str, float]], digits: int = 3) -> str:
    """A plain-text table of {row: {column: value}} (e.g. degradation -> attribute -> accuracy)."""
    cols = list(next(iter(report.values())))
    w = max(len(r) for r in report) + 2
    lines = [" " * w + "".join(f"{c:>11}" for c in cols)]
    for row, vals in report.items():
        lines.append(f"{row:<{w}}" + "".join(f"{vals.get(c, float('nan')):>11.{digits}f}" for c in cols))
    return "\n".join(lines)


def scatter_by(points, labels: list[str], ax=None, title: str = "", palette: dict | None = None, size: float = 6):
    """A 2-D scatter with one colour per label value and a legend (e.g. PCA of embeddings)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    points = np.asarray(points)
    values = sorted(set(labels), key=str)
    cmap = plt.get_cmap("tab10")
    for k, v in enumerate(values):
        sel = np.array([lab == v for lab in labels])
        colour = (palette or {}).get(v, cmap(k % 10))
        ax.scatter(points[sel, 0], points[sel, 1], s=size, color=colour, label=str(v), alpha=0.7,
                   edgecolors="grey" if v == "white" else "none", linewidths=0.3)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="best")
    return ax


def learning_curves(runs: list[dict], keys=(("judge_shape", "judge"), ("strict_shape", "strict reading")),
                    highlight: tuple[str, ...] = (), ax=None):
    """Shape accuracy against training CPU-minutes, one line per recipe run (benchmarks/decoder_recipes.py
    results: {"variant", "curve": [{"cpu_minutes", key: value}, ...]}); solid: the judge, dashed: the
    strict reading. Runs named in `highlight` are drawn thick."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab10")
    for k, run in enumerate(runs):
        x = [p["cpu_minutes"] for p in run["curve"]]
        for (key, label), style in zip(keys, ("-o", "--s")):
            y = [p[key] for p in run["curve"]]
            ax.plot(x, y, style, color=cmap(k % 10), lw=2.5 if run["variant"] in highlight else 1.0, markersize=3,
                    label=f"{run['variant']} ({label})")
    ax.axhline(1 / 6, color="0.5", lw=0.8, ls=":", label="chance (6 shapes)")
    ax.set_xlabel("training time (CPU minutes on the day measured)")
    ax.set_ylabel("decoded val z_i: shape accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return ax


def shape_vs_images(runs: list[dict], points: dict[str, tuple[int, float, float]], ax=None):
    """Shape accuracy against training images seen (log scale): the recipe runs' learning curves
    (judge solid, strict reading dashed) and labelled points {name: (images, judge, strict)}, e.g.
    the course decoder and the reference decoder."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        x = [p["step"] * run["batch_size"] for p in run["curve"]]
        ax.plot(x, [p["judge_shape"] for p in run["curve"]], "-", color="0.6", lw=1)
        ax.plot(x, [p["strict_shape"] for p in run["curve"]], "--", color="0.6", lw=1)
    for k, (name, (images, judge, strict)) in enumerate(points.items()):
        colour = plt.get_cmap("tab10")(k)
        ax.plot([images], [judge], "o", color=colour, label=f"{name}: judge")
        ax.plot([images], [strict], "s", color=colour, mfc="none", label=f"{name}: strict reading")
    ax.plot([], [], "-", color="0.6", label="recipe runs (grey): judge solid, strict dashed")
    ax.set_xscale("log")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("decoded val z_i: shape accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    return ax



PERCENT_MEASURES = ("fidelity", "both objects right", "both colours on the right objects")


def interval(ci, percent: bool) -> str:
    """"m [lo, hi]" for a (mean, low, high) triple; "m" when it has no interval, "—" when unmeasured."""
    if np.isnan(ci[0]):
        return "—"
    if np.isnan(ci[1]):
        return f"{ci[0]:.1%}" if percent else f"{ci[0]:.2f}"
    return f"{ci[0]:.1%} [{ci[1]:.1%}, {ci[2]:.1%}]" if percent else f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]"


def claims_table(rows: list[dict]) -> str:
    """Notebook 12's results as text: one line per claim row (`studies.claims.claim_row`)."""
    lines = [f"{'claim':38} {'split':8} {'measure':38} {'A':>24} {'B':>24} {'A - B':>26}  paper's direction"]
    for row in rows:
        pct = row["measure"] in PERCENT_MEASURES
        lines.append(f"{row['claim']:38} {row['split']:8} {row['measure']:38} {interval(row['A'], pct):>24} "
                     f"{interval(row['B'], pct):>24} {interval(row['A - B'], pct):>26}  {row['verdict']}")
    return "\n".join(lines)


def guidance_sweep_figure(sweep: dict[str, list[dict]], scales: list[float]):
    """Fidelity, diversity and Fréchet distance against the decoder's guidance scale, one line (with
    its bootstrap band) per system; `sweep[name]` holds one `system_report` per scale."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, reports in sweep.items():
        for ax, key, label in zip(axes, ("fidelity", "diversity_feature", "frechet"),
                                  ("fidelity (joint)", "diversity (judge features)", "Fréchet distance (16-dim)")):
            cis = [r[key] if key == "frechet" else summarise(r[key]) for r in reports]
            ax.plot(scales, [c[0] for c in cis], marker="o", label=name)
            ax.fill_between(scales, [c[1] for c in cis], [c[2] for c in cis], alpha=0.2)
            ax.set_xlabel("decoder guidance scale")
            ax.set_title(label)
            ax.grid(alpha=0.3)
    axes[0].legend()
    return fig


def pca_probe_figure(probe: dict, attributes=("background", "colour", "size", "shape", "count")):
    """The judge's accuracy on decodes of z_i truncated to its first k principal components, with the
    variance those k explain, and shape's accuracy with every component as a reference line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for attr in attributes:
        ax.plot(probe["ks"], [a.get(attr, float("nan")) for a in probe["accuracy"]], "-o", label=attr)
    ax.plot(probe["ks"], probe["explained"], "k:", label="variance explained")
    ax.axhline(probe["full"]["shape"], color="C3", lw=0.8, ls="--", label="shape, every component")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("principal components kept")
    ax.set_ylabel("judge accuracy (no caption) / variance explained")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def interval_bars(intervals, labels: list[str], title: str = "", ax=None, fontsize: int = 8):
    """Bars of (mean, low, high) triples with their intervals as error bars."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.4))
    vals = np.asarray(intervals, dtype=np.float64).reshape(-1, 3)
    ax.bar(range(len(vals)), vals[:, 0], yerr=[vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]], capsize=4)
    ax.set_xticks(range(len(vals)), labels, fontsize=fontsize)
    ax.set_title(title)
    return ax


# The course map: unCLIP's cascade at generation time (top row) and where its pieces come from (bottom
# row). Each box names the notebook that builds it; `pipeline_map(here=...)` highlights the current ones.
MAP_BOXES = {  # key: (label, notebook, x, y)
    "caption": ("caption y\n\"a small red star\"", None, 0.0, 1.0),
    "clip_text": ("CLIP text\nencoder", "03 · 04", 1.45, 1.0),
    "prior": ("prior\nP(z_i | y)", "07", 2.9, 1.0),
    "decoder": ("decoder\nP(x | z_i, y)\n32 px", "05 · 06", 4.35, 1.0),
    "upsampler": ("upsampler\n32 → 64 px", "08", 5.8, 1.0),
    "image": ("image x\n64 px", None, 7.25, 1.0),
    "world": ("ShapesWorld\nor your folder\n(image, caption)", "01 · 13", 0.0, 0.0),
    "clip_image": ("CLIP image\nencoder", "03 · 04", 2.9, 0.0),
    "judge": ("judge: reads\nshape, colour, ...", "02", 7.25, 0.0),
}
MAP_ARROWS = (("caption", "clip_text", ""), ("clip_text", "prior", "z_t"), ("prior", "decoder", "z_i"),
              ("decoder", "upsampler", ""), ("upsampler", "image", ""), ("world", "clip_image", "x"),
              ("clip_image", "prior", "z_i: the prior's target"),
              ("clip_image", "decoder", "true z_i"), ("image", "judge", ""))
NOTEBOOK_STAGES = {  # which boxes each notebook is about
    "01": ("world",), "02": ("judge",), "03": ("clip_text", "clip_image"), "04": ("clip_text", "clip_image"),
    "05": ("decoder",), "06": ("decoder",), "07": ("prior",), "08": ("upsampler",),
    "09": ("caption", "clip_text", "prior", "decoder", "upsampler", "image"),  # the whole generation path
    "10": ("clip_image", "decoder"), "11": ("clip_text", "clip_image", "decoder"), "12": ("judge", "prior", "decoder"),
    "13": ("world", "clip_text", "clip_image", "prior", "decoder", "upsampler"),  # every stage, on your folder
}


def pipeline_map(here=(), title: str | None = None, ax=None):
    """Draw the course map. `here`: box keys (see MAP_BOXES) or a notebook number ("03"), highlighted;
    everything else is drawn in grey. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    keys = NOTEBOOK_STAGES.get(here, (here,)) if isinstance(here, str) else tuple(here)
    unknown = [k for k in keys if k not in MAP_BOXES]
    if unknown:
        raise ValueError(f"pipeline_map: unknown box {unknown[0]!r}; choose from {sorted(MAP_BOXES)} "
                         f"or a notebook number {sorted(NOTEBOOK_STAGES)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 2.9))
    w, h = 1.05, 0.62
    for key, (label, nb, x, y) in MAP_BOXES.items():
        on = key in keys
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor="#ffd966" if on else "#f2f2f2", edgecolor="#b45f06" if on else "0.6",
                                    lw=2.2 if on else 1.0))
        ax.text(x, y + (0.05 if nb else 0), label, ha="center", va="center", fontsize=8,
                color="black" if on or not keys else "0.35", fontweight="bold" if on else "normal")
        if nb:
            ax.text(x, y - h / 2 + 0.07, f"notebook{'s' if '·' in nb else ''} {nb}", ha="center", va="center", fontsize=6.5, color="0.3")
    for a, b, label in MAP_ARROWS:
        (xa, ya), (xb, yb) = MAP_BOXES[a][2:], MAP_BOXES[b][2:]
        if ya == yb:  # along a row
            start, end, style, at = (xa + w / 2, ya), (xb - w / 2, yb), "arc3", ((xa + xb) / 2, ya + 0.07)
        elif xa == xb:  # straight up or down
            up = 1 if yb > ya else -1
            start, end, style, at = (xa, ya + up * h / 2), (xb, yb - up * h / 2), "arc3", (xa + 0.06, (ya + yb) / 2)
        else:  # out of the right side, then up into the box above
            start, end, style = (xa + w / 2, ya), (xb, yb - h / 2), "angle,angleA=0,angleB=90"
            at = ((start[0] + xb) / 2, ya + 0.07)
        ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color="0.25", lw=1.2, connectionstyle=style,
                                                      shrinkA=0, shrinkB=0))
        if label:
            ax.text(*at, label, ha="left" if xa == xb else "center", fontsize=7.5, style="italic")
    (xc, yc), (xd, yd) = MAP_BOXES["clip_text"][2:], MAP_BOXES["decoder"][2:]  # the decoder also reads the caption
    ax.annotate("", (xd - 0.2, yd + h / 2), (xc + 0.2, yc + h / 2),
                arrowprops=dict(arrowstyle="-|>", color="0.45", lw=1.0, ls="--", shrinkA=0, shrinkB=0,
                                connectionstyle="bar,fraction=-0.1"))
    ax.text((xc + xd) / 2, yc + h / 2 + 0.34, "the caption's token states (the decoder reads y too)", ha="center",
            fontsize=7, style="italic", color="0.3")
    ax.text(-0.55, 1.42, "generating", fontsize=7, color="0.4")
    ax.text(-0.55, 0.42 - 0.02, "training and measuring", fontsize=7, color="0.4")
    ax.set_xlim(-0.6, 7.85)
    ax.set_ylim(-0.4, 1.75)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax.figure
