"""Numbers for the report: per-configuration mean ± std over seeds, Welch's t-test against a
baseline, mean validation curves with a band, and the power-law fit L(N) = a * N^-alpha + c.

std is the sample standard deviation (ddof=1): with three seeds we estimate the spread of a
population of seeds, not describe the three we happened to draw.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyllm.analysis.sweep import Run, Sweep, split_override
from tinyllm.errors import TinyLLMError


@dataclass
class ConfigSummary:
    """One row of the table: the runs of one configuration (all seeds)."""

    key: tuple[tuple[str, str], ...]  # ((swept key, value), ...)
    runs: list[Run]
    finals: list[float] = field(default_factory=list)  # final metric of each completed run
    mean: float | None = None
    std: float | None = None  # None when n < 2
    params: float | None = None
    tokens_per_s: float | None = None
    delta: float | None = None  # mean - baseline mean
    p_value: float | None = None  # Welch's t-test vs the baseline; None when n < 2 on a side
    is_baseline: bool = False

    @property
    def n(self) -> int:
        return len(self.finals)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key) or "all runs"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def _mean_of(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch's t-test p-value; None when either side has fewer than 2 values or the
    test is undefined (both sides without spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # zero variance on both sides: scipy warns and returns nan
        warnings.simplefilter("ignore")
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def parse_baseline(spec: str) -> dict[str, str]:
    """`"pos=learned,norm=layernorm"` -> {"pos": "learned", "norm": "layernorm"}."""
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, value = split_override(part)
        if "=" not in part or not key:
            raise TinyLLMError(
                f"--baseline {spec!r}: {part!r} is not key=value. Give the baseline as the "
                'swept values of one configuration, e.g. --baseline "pos=learned,norm=layernorm".'
            )
        out[key] = value
    return out


def summarize(sweep: Sweep, metric: str, baseline: str | None = None) -> list[ConfigSummary]:
    """Group runs by their swept values (seeds pooled), in sweep order, with stats vs baseline."""
    groups: dict[tuple, ConfigSummary] = {}
    for run in sweep.runs:
        key = sweep.config_key(run)
        groups.setdefault(key, ConfigSummary(key=key, runs=[])).runs.append(run)
    rows = list(groups.values())
    for row in rows:
        row.finals = [f for f in (r.final(metric) for r in row.runs) if f is not None]
        if row.finals:
            row.mean = float(np.mean(row.finals))
            row.std = float(np.std(row.finals, ddof=1)) if row.n >= 2 else None
        measured = [r for r in row.runs if r.metrics]
        row.params = _mean_of([_num(r.metrics.get("params")) for r in measured])
        # throughput of runs that ran normally: a failed run may have died mid-warmup
        done = [r for r in measured if r.status == "completed"] or [
            r for r in measured if r.status != "failed"
        ]
        row.tokens_per_s = _mean_of([_num(r.metrics.get("train/tokens_per_s")) for r in done])
    if not rows:
        return rows

    base = _pick_baseline(rows, sweep, baseline)
    base.is_baseline = True
    for row in rows:
        if row.mean is not None and base.mean is not None:
            row.delta = row.mean - base.mean
        if row is not base:
            row.p_value = welch_p_value(row.finals, base.finals)
    return rows


# Run-health columns of the report (tinyllm/health.py): stability beside quality.
HEALTH_COLUMNS = (
    ("max grad norm", "max_grad_norm"),
    ("spikes", "spike_count"),
    ("last-layer update ratio", "last_layer_update_ratio"),
)


def health_cells(row: ConfigSummary) -> list[tuple[float, float | None] | None]:
    """(mean, std or None) over the row's completed runs, per HEALTH_COLUMNS entry."""
    done = [r for r in row.runs if r.status == "completed"]
    out: list[tuple[float, float | None] | None] = []
    for _, key in HEALTH_COLUMNS:
        vals = [_num((r.metrics.get("health") or {}).get(key)) for r in done]
        vals = [v for v in vals if v is not None]
        if not vals:
            out.append(None)
            continue
        std = float(np.std(vals, ddof=1)) if len(vals) >= 2 else None
        out.append((float(np.mean(vals)), std))
    return out


def _num(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pick_baseline(rows: list[ConfigSummary], sweep: Sweep, spec: str | None) -> ConfigSummary:
    if not spec:
        return rows[0]
    want = parse_baseline(spec)
    unknown = [k for k in want if k not in sweep.swept_keys]
    choices = "; ".join(r.label for r in rows)
    if unknown:
        raise TinyLLMError(
            f"--baseline {spec!r} names {', '.join(unknown)}, which this sweep does not vary "
            f"(swept keys: {', '.join(sweep.swept_keys) or 'none'}). Pick one of the "
            f"configurations: {choices}."
        )
    matches = [r for r in rows if all(dict(r.key).get(k) == v for k, v in want.items())]
    if len(matches) != 1:
        what = "matches no configuration" if not matches else "matches several configurations"
        raise TinyLLMError(
            f"--baseline {spec!r} {what} of this sweep; give the swept values of exactly one "
            f"of: {choices}."
        )
    return matches[0]


@dataclass
class Curve:
    """A configuration's validation curve: the mean over seeds at each evaluated step."""

    label: str
    steps: np.ndarray
    times: np.ndarray  # mean wall time (s) at which the seeds reached each step
    mean: np.ndarray
    lo: np.ndarray  # band: min over seeds, or mean - std
    hi: np.ndarray
    n: np.ndarray  # how many seeds contributed at each step


def mean_curve(runs: Sequence[Run], label: str, band: str = "minmax") -> Curve | None:
    """Pool the runs' curves step by step (seeds evaluate at the same steps; a running seed
    contributes to the steps it has reached). Failed runs are left out by the caller."""
    by_step: dict[float, list[tuple[float, float]]] = {}
    for r in runs:
        for s, t, v in zip(r.steps, r.times, r.values):
            by_step.setdefault(s, []).append((t, v))
    if not by_step:
        return None
    steps = np.array(sorted(by_step))
    times, mean, lo, hi, n = [], [], [], [], []
    for s in steps:
        ts = np.array([p[0] for p in by_step[s]], dtype=float)
        vs = np.array([p[1] for p in by_step[s]], dtype=float)
        times.append(np.nanmean(ts) if np.isfinite(ts).any() else np.nan)
        m = float(vs.mean())
        mean.append(m)
        if band == "std":
            sd = float(vs.std(ddof=1)) if len(vs) > 1 else 0.0
            lo.append(m - sd)
            hi.append(m + sd)
        else:
            lo.append(float(vs.min()))
            hi.append(float(vs.max()))
        n.append(len(vs))
    return Curve(label, steps, np.array(times), *(np.array(x) for x in (mean, lo, hi, n)))


@dataclass
class PowerLawFit:
    """L(N) = a * N^-alpha + c. `method` is "curve_fit" (all three) or "loglog" (c fixed at 0)."""

    a: float
    alpha: float
    c: float
    method: str
    n_points: int

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.a * np.power(n, -self.alpha) + self.c

    def __str__(self) -> str:
        return f"L(N) = {self.a:.4g} * N^-{self.alpha:.4g} + {self.c:.4g}"


def fit_power_law(params: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Fit L(N) = a * N^-alpha + c to (parameter count, loss) points (seeds may repeat an N).

    scipy's curve_fit on N / N0 (N0 the geometric mean, so that a is of the order of the losses
    and the optimiser is well conditioned), started from a log-log fit; with fewer than 3
    distinct N, or when curve_fit fails, the log-log linear fit log L = log a - alpha log N
    (c = 0) is returned instead.
    """
    n = np.asarray(params, dtype=float)
    y = np.asarray(losses, dtype=float)
    ok = np.isfinite(n) & np.isfinite(y) & (n > 0) & (y > 0)
    n, y = n[ok], y[ok]
    if len(np.unique(n)) < 2:
        raise TinyLLMError(
            "fit_power_law needs losses at 2 or more different parameter counts (finite, "
            f"positive); got {len(np.unique(n))}. Sweep the model size, e.g. "
            "model=nano,micro,tiny,small."
        )
    slope, intercept = np.polyfit(np.log(n), np.log(y), 1)
    loglog = PowerLawFit(float(np.exp(intercept)), float(-slope), 0.0, "loglog", len(n))
    if len(np.unique(n)) < 3:
        return loglog

    from scipy.optimize import curve_fit

    n0 = float(np.exp(np.log(n).mean()))
    x = n / n0

    def f(x: np.ndarray, a: float, alpha: float, c: float) -> np.ndarray:
        return a * np.power(x, -alpha) + c

    # start: c just under the smallest loss, alpha and a from a log-log fit of L - c
    c0 = 0.5 * float(y.min())
    s0, i0 = np.polyfit(np.log(x), np.log(y - c0), 1)
    p0 = [float(np.exp(i0)), float(min(max(-s0, 1e-3), 4.0)), c0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (a, alpha, c), _ = curve_fit(
                f,
                x,
                y,
                p0=p0,
                bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, float(y.min())]),
                maxfev=20000,
            )
    except (RuntimeError, ValueError):
        return loglog
    if not all(math.isfinite(v) for v in (a, alpha, c)):
        return loglog
    # undo the rescaling: a * (N / n0)^-alpha == (a * n0^alpha) * N^-alpha
    return PowerLawFit(float(a * n0**alpha), float(alpha), float(c), "curve_fit", len(n))


def time_to_reach(times: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """Seconds until a validation curve first reaches `target` (values falling), linearly
    interpolated between the two validations around the crossing; None if it never does."""
    prev: tuple[float, float] | None = None
    for t, v in zip(times, values, strict=True):
        if not math.isfinite(v):
            continue
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            t0, v0 = prev
            return float(t0 + (t - t0) * (v0 - target) / (v0 - v))
        prev = (t, v)
    return None
