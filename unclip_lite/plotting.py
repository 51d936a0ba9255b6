"""Figures for the notebooks: image grids, sample tables and curves (matplotlib)."""
from __future__ import annotations

import textwrap

import numpy as np
import torch

from .images import to_numpy_hwc
from .stats import proportion_ci, summarise


def _as_uint8(images) -> np.ndarray:
    """(N, 3, H, W) uint8/float[-1,1] tensors or (N, H, W, 3) uint8 arrays -> (N, H, W, 3) uint8."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.detach().cpu().permute(0, 2, 3, 1).numpy()
        return to_numpy_hwc(images)
    x = np.asarray(images)
    return x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1)


def _wrap(text: str, width: int, max_lines: int = 4) -> str:
    """`text` wrapped to `width` characters per line, its own line breaks kept, at most `max_lines`."""
    lines = [w for line in text.split("\n") for w in (textwrap.wrap(line, width) or [""])]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1][:width - 1] + "…"]
    return "\n".join(lines)


def image_grid(images, titles: list[str] | None = None, ncols: int = 8, scale: float = 1.6,
               title: str | None = None, fontsize: int = 7, row_labels: list[str] | None = None,
               title_colors: list | None = None):
    """Show images in a grid; returns the figure.

    `titles`: one per image, wrapped to the panel's width (never cut mid-word, at most four lines;
    the row height grows to fit). `row_labels`: one per row, written sideways left of the row, for
    grids whose rows mean something (real / decoded, a guidance scale, a system). `title_colors`:
    one colour per title (e.g. green where the judge reads the image right, red where it does not).
    """
    import matplotlib.pyplot as plt

    imgs = _as_uint8(images)
    n = len(imgs)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    chars = max(8, int(scale * 72 / (0.58 * fontsize)))  # characters of this size that fit a panel's width
    wrapped = [_wrap(str(t), chars) for t in titles] if titles else None
    lines = max(t.count("\n") + 1 for t in wrapped) if wrapped else 0
    title_h = lines * fontsize * 1.4 / 72 + (0.08 if wrapped else 0)  # inches of title above each row
    label_w = (fontsize + 6) / 72 * 1.6 if row_labels else 0
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale + label_w, nrows * (scale + title_h) + (0.35 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(imgs[i], interpolation="nearest")
        if wrapped:
            ax.set_title(wrapped[i], fontsize=fontsize, color=title_colors[i] if title_colors else "black")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].text(-0.06, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=fontsize + 1)
    if title:
        fig.suptitle(_wrap(title, max(20, int((ncols * scale + label_w) * 72 / (0.58 * 11))), 3), fontsize=11)
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
    top = 0.0
    for k, run in enumerate(runs):
        x = [p["cpu_minutes"] for p in run["curve"]]
        for (key, _), style in zip(keys, ("-o", "--s")):
            y = [p[key] for p in run["curve"]]
            top = max(top, *y)
            ax.plot(x, y, style, color=cmap(k % 10), lw=2.5 if run["variant"] in highlight else 1.0, markersize=3)
        n = run.get("final", {}).get("n")
        if n:  # the last point's 95% interval: how far apart two recipes must end to differ
            end, lo, hi = proportion_ci(run["curve"][-1][keys[0][0]], n)
            ax.errorbar([x[-1]], [end], yerr=[[end - lo], [hi - end]], color=cmap(k % 10), capsize=3, lw=1)
            top = max(top, hi)
        ax.plot([], [], "-", color=cmap(k % 10), lw=2.5 if run["variant"] in highlight else 1.0, label=run["variant"])
    for (_, label), style in zip(keys, ("-o", "--s")):
        ax.plot([], [], style, color="0.3", markersize=3, label=label)
    ax.axhline(1 / 6, color="0.5", lw=0.8, ls=":", label="chance (6 shapes)")
    ax.set_xlabel("training time (CPU minutes on the day measured)")
    ax.set_ylabel("decoded val z_i: shape accuracy")
    ax.set_ylim(0, min(1.0, top + 0.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="colour: recipe; line: reader (bar: 95% interval)", title_fontsize=7)
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
    ax.axhline(1 / 6, color="0.5", lw=0.8, ls=":", label="chance (6 shapes)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # only the powers of ten are labelled
    ax.margins(x=0.08)
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
                                  ("fidelity (joint): higher is better", "diversity (judge features): higher is more varied",
                                   "Fréchet distance (16-dim): lower is closer to real")):
            cis = [r[key] if key == "frechet" else summarise(r[key]) for r in reports]
            line, = ax.plot(scales, [c[0] for c in cis], marker="o", label=name)
            ax.fill_between(scales, [c[1] for c in cis], [c[2] for c in cis], color=line.get_color(), alpha=0.2)
            ax.set_xlabel("decoder guidance scale")
            ax.set_title(label)
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over captions (band: 95% interval)")
    axes[0].legend()
    fig.tight_layout()
    return fig


def pca_probe_figure(probe: dict, chance: dict, level: float = 0.9,
                     attributes=("background", "colour", "size", "shape")):
    """`studies.claims.pca_probe` in two panels, against the principal components kept (log scale).
    Left: the judge's accuracy per attribute, its chance level dotted in the same colour. Right: how
    far each attribute has come from chance toward its accuracy with every component, the line at
    `level` marking "arrived" (`components_needed`), with the share of variance the components
    explain in black. `chance`: {attribute: accuracy of a uniform guess}."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, attr in enumerate(attributes):
        colour = f"C{i}"
        acc = [a.get(attr, float("nan")) for a in probe["accuracy"]]
        left.plot(probe["ks"], acc, "-o", color=colour, label=attr)
        left.axhline(chance[attr], color=colour, ls=":", lw=1)
        full = probe["full"].get(attr, float("nan"))
        span = full - chance[attr]  # no better than chance with every component: no way to come (drawn empty)
        right.plot(probe["ks"], [(x - chance[attr]) / span if span > 0 else float("nan") for x in acc], "-o", color=colour,
                   label=attr)
    right.plot(probe["ks"], probe["explained"], "k--", label="variance explained")
    right.axhline(level, color="0.4", lw=1)
    right.text(probe["ks"][0], level + 0.02, f"{level:.0%} of the way: arrived", fontsize=8, color="0.3")
    left.set_title("judge accuracy on decodes (dotted: chance)")
    left.set_ylabel("accuracy")
    right.set_title("from chance (0) to every component (1)")
    right.set_ylabel("share of the way / of the variance")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("principal components of z_i kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
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
