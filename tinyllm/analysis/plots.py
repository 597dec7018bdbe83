"""PNG plots for the report (matplotlib, Agg backend: no display needed).

Every figure is written to a temporary name and renamed, so a crash never leaves half a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyllm.analysis.stats import ConfigSummary, Curve, PowerLawFit
from tinyllm.io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))


# Zooming cuts the first evaluations off the plot; it only helps when enough points remain to
# draw a curve: with two or three evaluations it left stubs of lines poking in from the top.
MIN_POINTS_TO_ZOOM = 4


def _zoom(ax, curves: Sequence[Curve], x: str) -> None:
    """Zoom the y axis onto the last 90% of training when the first evaluations (a random
    model's loss) would otherwise squash the differences the plot is about, and every curve
    keeps at least MIN_POINTS_TO_ZOOM - 1 points in view."""
    lo, hi, late_hi = np.inf, -np.inf, -np.inf
    for c in curves:
        xs = c.steps if x == "step" else c.times
        keep = np.isfinite(xs)
        if not keep.any():
            continue
        xs, clo, chi = xs[keep], c.lo[keep], c.hi[keep]
        late = xs >= xs.min() + 0.1 * (xs.max() - xs.min())
        if late.sum() < MIN_POINTS_TO_ZOOM - 1:
            return  # too few evaluations: show every point
        lo, hi = min(lo, clo.min()), max(hi, chi.max())
        late_hi = max(late_hi, chi[late].max())
    if np.isfinite([lo, hi, late_hi]).all() and late_hi > lo and hi - lo > 2 * (late_hi - lo):
        pad = 0.05 * (late_hi - lo)
        ax.set_ylim(lo - pad, late_hi + pad)


def plot_curves(curves: Sequence[Curve], metric: str, x: str, path: Path, title: str = "") -> Path:
    """One line per configuration (mean over seeds) with its band; x is "step" or "time"."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        xs = c.steps if x == "step" else c.times
        keep = np.isfinite(xs)  # time is unknown for points without a time stamp
        if not keep.any():
            continue
        label = f"{c.label} (n={int(c.n.max())})"
        marker = "o" if keep.sum() <= 20 else None  # few evaluations: show where they are
        (line,) = ax.plot(xs[keep], c.mean[keep], label=label, lw=1.5, marker=marker, ms=4)
        if (c.n[keep] > 1).any():
            ax.fill_between(xs[keep], c.lo[keep], c.hi[keep], color=line.get_color(), alpha=0.2)
    _zoom(ax, curves, x)
    ax.set_xlabel("step" if x == "step" else "wall time (s)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {'step' if x == 'step' else 'wall time'}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_scaling(
    rows: Sequence[ConfigSummary], fit: PowerLawFit | None, metric: str, path: Path
) -> Path:
    """Final metric vs parameter count (log x): every seed, the per-configuration mean ± std,
    and the fitted power law."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(r.params, f) for r in rows if r.params for f in r.finals]
    if pts:
        ax.scatter(*zip(*pts), s=12, color="gray", alpha=0.6, label="runs (seeds)")
    means = [r for r in rows if r.params and r.mean is not None]
    if means:
        ax.errorbar(
            [r.params for r in means],
            [r.mean for r in means],
            yerr=[r.std or 0.0 for r in means],
            fmt="o",
            capsize=3,
            label="mean ± std",
        )
        for r in means:
            ax.annotate(
                r.label, (r.params, r.mean), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
    if fit is not None and means:
        lo, hi = min(r.params for r in means), max(r.params for r in means)
        ns = np.geomspace(lo / 1.5, hi * 1.5, 200)
        ax.plot(ns, fit(ns), "--", label=str(fit))
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} vs model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
