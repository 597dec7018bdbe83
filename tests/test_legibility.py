"""Figures a newcomer opens first: attention maps (tinyllm/visualize.py) and sweep curves
(tinyllm/analysis/plots.py) stay legible at their default sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinyllm.analysis.plots import _pyplot, _zoom, plot_curves
from tinyllm.analysis.stats import Curve
from tinyllm.visualize import attention_figure


def _curve(label: str, steps: list[float], vals: list[float]) -> Curve:
    s, v = np.array(steps, float), np.array(vals, float)
    return Curve(label, s, s * 0.05, v, v - 0.01, v + 0.01, np.full(len(s), 3))


def _ylim_after_zoom(curves: list[Curve]) -> tuple[float, float]:
    plt = _pyplot()
    fig, ax = plt.subplots()
    for c in curves:
        ax.plot(c.steps, c.mean)
    _zoom(ax, curves, "step")
    lim = ax.get_ylim()
    plt.close(fig)
    return lim


def test_two_validation_points_are_all_in_view(tmp_path: Path) -> None:
    # (the zoom used to cut the first point off, leaving stubs of lines from the top edge)
    curves = [_curve("a", [500, 1000], [3.1, 2.55]), _curve("b", [500, 1000], [3.0, 2.45])]
    lo, hi = _ylim_after_zoom(curves)
    assert lo <= 2.44 and hi >= 3.11
    assert plot_curves(curves, "val/bpb", "step", tmp_path / "c.png").stat().st_size > 0


def test_long_curves_still_zoom_past_the_random_model() -> None:
    steps = list(range(0, 1100, 100))
    vals = [8.0] + [3.0 - 0.05 * i for i in range(1, 11)]  # step 0: a random model's loss
    lo, hi = _ylim_after_zoom([_curve("a", steps, vals)])
    assert hi < 4.0 and lo < 2.5


def test_attention_map_labels_are_readable_and_there_is_a_colour_bar() -> None:
    T = 32
    attn = torch.softmax(torch.randn(2, T, T), dim=-1)
    fig = attention_figure([attn, attn], [f"t{i}" for i in range(T)], title="x")
    maps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(maps) == 4 and len(bars) == 1  # 2 layers x 2 heads + one shared colour bar
    assert "attention weight" in bars[0].get_ylabel()
    corner = maps[2]  # bottom-left map carries both axes' labels
    sizes = [t.get_fontsize() for t in corner.get_xticklabels() + corner.get_yticklabels()]
    assert len(sizes) == 2 * T and min(sizes) >= 8  # (was 6 pt)
    assert [t.get_text() for t in corner.get_xticklabels()][:2] == ["t0", "t1"]
