"""Turn a Hydra multirun folder into a table you can trust and plots you can show.

    python -m tinyllm.report outputs/multirun/2026-11-22/01-00-00
    python -m tinyllm.report DIR --baseline "pos=learned,norm=layernorm" --metric val/loss
    python -m tinyllm.report DIR --scaling          # + final metric vs params, power-law fit

Reads DIR/multirun.yaml and every job folder DIR/<n>/ (.hydra/overrides.yaml, metrics.json,
TensorBoard events under tb/ when metrics.json has no history), pools seeds into one row per
configuration, and writes DIR/report.md plus PNG plots beside it; prints the table too.
Partial sweeps are fine: failed and running jobs are listed as such. Exit status 2 (and a
one-paragraph message) when there is nothing at all to report.

A plain argparse entry point: the contract is positional (`report DIR`), and a report has no
config tree worth composing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tinyllm.analysis import (
    HEALTH_COLUMNS,
    ConfigSummary,
    Curve,
    PowerLawFit,
    Sweep,
    fit_power_law,
    health_cells,
    load_sweep,
    mean_curve,
    summarize,
)
from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.io import write_text_atomic


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _fmt_params(v: float | None) -> str:
    if v is None:
        return "—"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def _fmt_counts(row: ConfigSummary) -> str:
    counts = row.counts()
    order = ["completed", "failed", "running"] + sorted(
        set(counts) - {"completed", "failed", "running"}
    )
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def table_rows(sweep: Sweep, rows: list[ConfigSummary], metric: str) -> tuple[list, list]:
    """(header, rows of strings) shared by the Markdown and the terminal table."""
    header = [
        *sweep.swept_keys,
        "params",
        f"{metric} (mean ± std)",
        "n",
        "Δ vs baseline",
        "p (Welch)",
        "tokens/s",
        "runs",
    ]
    if not sweep.swept_keys:
        header = ["configuration", *header]
    health = [health_cells(r) for r in rows]
    shown = [i for i in range(len(HEALTH_COLUMNS)) if any(h[i] for h in health)]
    header += [HEALTH_COLUMNS[i][0] for i in shown]
    from tinyllm.eval.report import eval_columns  # eval/* figures beside the metric

    eval_header, eval_cells = eval_columns(rows)
    at = header.index("n")
    header[at:at] = eval_header
    out = []
    for r, h in zip(rows, health):
        value = "—"
        if r.mean is not None:
            value = _fmt(r.mean) + (f" ± {_fmt(r.std)}" if r.std is not None else " ± n/a")
        delta = (
            "baseline"
            if r.is_baseline
            else ("—" if r.delta is None else f"{r.delta:+.4f}".replace("-0.0000", "+0.0000"))
        )
        cells = [v for _, v in r.key] or ["all runs"]
        out.append(
            [
                *cells,
                _fmt_params(r.params),
                value,
                *eval_cells[len(out)],
                str(r.n),
                delta,
                "—" if r.is_baseline else _fmt_p(r.p_value),
                "—" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
                _fmt_counts(r),
                *(_fmt_pooled(h[i]) for i in shown),
            ]
        )
    return header, out


def _fmt_pooled(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "—"
    mean, std = cell
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(text: str | None, limit: int = 300) -> str:
    """One line of an error: a traceback's last line (the exception), else the text."""
    text = str(text or "").strip()
    if text.startswith("Traceback"):
        text = text.splitlines()[-1]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _overrides_str(run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.overrides.items())


def build_report(
    sweep: Sweep,
    metric: str = "val/bpb",
    baseline: str | None = None,
    out_dir: Path | None = None,
    scaling: bool | None = None,
    band: str = "minmax",
) -> dict:
    """Compute everything, write report.md and the PNGs into out_dir; return what was made.

    Raises TinyLLMError when there is nothing at all to report for `metric`.
    """
    out_dir = Path(out_dir or sweep.root)
    rows = summarize(sweep, metric, baseline)
    has_final = any(r.finals for r in rows)
    has_curve = any(run.values for run in sweep.runs)
    if not has_final and not has_curve:
        _raise_nothing(sweep, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _curve_plots(rows, metric, band, out_dir)
    fit, scaling, scaling_note = _scaling(sweep, rows, metric, scaling, out_dir, plots)
    base = next(r for r in rows if r.is_baseline)
    if base.mean is None:
        sweep.warnings.append(
            f"the baseline {base.label} has no completed run with a final {metric} yet, so "
            "there is no Δ or p-value; pick another with --baseline"
        )
    header, cells = table_rows(sweep, rows, metric)
    md = _markdown(sweep, rows, metric, header, cells, plots, fit, scaling, scaling_note, band)
    report = out_dir / "report.md"
    write_text_atomic(report, md)
    return {
        "report": report,
        "plots": plots,
        "rows": rows,
        "fit": fit,
        "header": header,
        "cells": cells,
    }


def _curve_plots(rows: list, metric: str, band: str, out_dir: Path) -> dict[str, Path]:
    """Mean curves per configuration over its completed and running seeds (a failed run's
    curve would drag the mean), against step and, when known, time."""
    curves: list[Curve] = []
    for r in rows:
        live = [run for run in r.runs if run.status != "failed"]
        c = mean_curve(live, r.label, band=band)
        if c is not None:
            curves.append(c)
    plots: dict[str, Path] = {}
    if curves:
        from tinyllm.analysis.plots import plot_curves

        slug = metric.replace("/", "_")
        plots["step"] = plot_curves(curves, metric, "step", out_dir / f"{slug}_vs_step.png")
        if any(math.isfinite(t) for c in curves for t in c.times):
            plots["time"] = plot_curves(curves, metric, "time", out_dir / f"{slug}_vs_time.png")
    return plots


def _scaling(
    sweep: Sweep, rows: list, metric: str, scaling: bool | None, out_dir: Path, plots: dict
) -> tuple[PowerLawFit | None, bool, str]:
    """The power-law fit when asked for, or when the sweep varies only `model` over sizes."""
    fit: PowerLawFit | None = None
    scaling_note = ""
    sizes = {r.params for r in rows if r.params and r.finals}
    if scaling is None:
        scaling = sweep.swept_keys == ["model"] and len(sizes) >= 2
    if scaling:
        points = [(r.params, f) for r in rows if r.params for f in r.finals]
        try:
            fit = fit_power_law([p for p, _ in points], [f for _, f in points])
        except TinyLLMError as e:
            scaling_note = str(e)
        if len({r.params for r in rows if r.params}) >= 1:
            from tinyllm.analysis.plots import plot_scaling

            slug = metric.replace("/", "_")
            plots["scaling"] = plot_scaling(rows, fit, metric, out_dir / f"{slug}_vs_params.png")
    return fit, scaling, scaling_note


def _raise_nothing(sweep: Sweep, metric: str) -> None:
    runs = sweep.runs
    with_metrics = [r for r in runs if r.metrics]
    keys = sorted(
        {
            k
            for r in with_metrics
            for k, v in r.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    statuses = ", ".join(f"{n} {s}" for s, n in _status_counts(runs).items())
    if not with_metrics:
        why = (
            f"none of its {len(runs)} job(s) has a metrics.json or TensorBoard scalars for "
            f"{metric!r} yet ({statuses}); wait for the jobs to write their first evaluation, "
            "or check their logs if they died before that"
        )
    else:
        why = (
            f"no job has a final {metric!r} or a curve of it ({statuses}); metrics.json holds "
            f"{', '.join(keys) or 'no numbers'}: pick one of those with --metric"
        )
        failed = [r for r in runs if r.status == "failed"]
        if failed and len(failed) == len(runs):
            why += f". All jobs failed; the first error: {_short(failed[0].error, 200)}"
    raise TinyLLMError(f"Nothing to report in {sweep.root}: {why}.")


def _status_counts(runs) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def _markdown(sweep, rows, metric, header, cells, plots, fit, scaling, scaling_note, band) -> str:
    lines = _md_head(sweep, rows, metric, header, cells)
    lines += _md_curves(metric, plots, band)
    if scaling:
        lines += _md_scaling(metric, plots, fit, scaling_note)
    lines += _md_other_runs(sweep, metric)
    return "\n".join(lines)


def _md_head(sweep: Sweep, rows: list, metric: str, header: list, cells: list) -> list[str]:
    counts = _status_counts(sweep.runs)
    jobs = f"{len(sweep.runs)} job(s)"
    if sweep.expected_jobs and sweep.expected_jobs >= len(sweep.runs):
        jobs += f" of {sweep.expected_jobs} in the sweep"
    status = ", ".join(f"{n} {s}" for s, n in counts.items())
    base = next((r for r in rows if r.is_baseline), None)
    lines = [f"# Sweep report: `{sweep.root}`", ""]
    if sweep.command:
        lines += [f"Command: `{sweep.command}`", ""]
    lines += [f"Jobs: {jobs}: {status}."]
    if sweep.fixed:
        lines += [
            "Fixed overrides: " + ", ".join(f"`{k}={v}`" for k, v in sweep.fixed.items()) + "."
        ]
    seeds = ", ".join(f"`{k}`" for k in sweep.seed_keys) or "none swept"
    lines += [
        f"Seeds pooled: {seeds}. Metric: final `{metric}` of completed runs, mean ± sample std "
        f"(ddof=1) over n seeds. Δ and p: against the baseline `{base.label if base else '—'}`"
        ", two-sided Welch's t-test (n/a when a side has fewer than 2 runs).",
        "",
        "## Results",
        "",
        _md_table(header, cells),
        "",
    ]
    return lines


def _md_curves(metric: str, plots: dict, band: str) -> list[str]:
    lines: list[str] = []
    if plots.get("step") or plots.get("time"):
        what = "min–max" if band == "minmax" else "± 1 std"
        lines += [
            "## Validation curves",
            "",
            f"Mean over seeds (completed and running runs; failed runs left out), band: {what} "
            "over seeds. The y axis is zoomed onto the last 90% of training when the first "
            "evaluations would squash the differences.",
            "",
        ]
        for k in ("step", "time"):
            if k in plots:
                lines += [f"![{metric} vs {k}]({plots[k].name})", ""]
    else:
        lines += [
            "No validation curves: neither metrics.json history nor TensorBoard scalars "
            f"hold `{metric}`.",
            "",
        ]
    return lines


def _md_scaling(metric: str, plots: dict, fit: PowerLawFit | None, scaling_note: str) -> list[str]:
    lines: list[str] = []
    lines += ["## Scaling", ""]
    if fit is not None:
        how = (
            "scipy curve_fit of all three parameters"
            if fit.method == "curve_fit"
            else "log-log linear fit with c = 0 (too few sizes, or curve_fit failed)"
        )
        lines += [
            f"Fit over {fit.n_points} runs (N = `params` from metrics.json): `{fit}` ({how}).",
            "",
            f"a = {fit.a:.6g}, alpha = {fit.alpha:.6g}, c = {fit.c:.6g}",
            "",
        ]
    else:
        lines += [f"No fit: {scaling_note}", ""]
    if "scaling" in plots:
        lines += [f"![{metric} vs parameters]({plots['scaling'].name})", ""]
    return lines


def _md_other_runs(sweep: Sweep, metric: str) -> list[str]:
    """Failed, running or incomplete, and excluded jobs; the loader's warnings."""
    lines: list[str] = []
    failed = [r for r in sweep.runs if r.status == "failed"]
    if failed:
        lines += ["## Failed runs", "", "| job | overrides | error |", "|---|---|---|"]
        lines += [
            f"| {r.num} | `{_overrides_str(r)}` | {_short(r.error).replace('|', '/')} |"
            for r in failed
        ]
        lines += [""]
    pending = [r for r in sweep.runs if r.status not in ("completed", "failed")]
    if pending:
        lines += [
            "## Running or incomplete runs",
            "",
            f"| job | overrides | status | last step | last {metric} |",
            "|---|---|---|---|---|",
        ]
        for r in pending:
            status = r.status if r.metrics or r.status != "running" else "running (no metrics.json)"
            step = _fmt(r.steps[-1], 0) if r.steps else "—"
            lines.append(
                f"| {r.num} | `{_overrides_str(r)}` | {status} | {step} | "
                f"{_fmt(r.last_value(metric))} |"
            )
        lines += [""]
    if sweep.excluded:
        lines += ["## Excluded jobs", "", "| job | overrides | why |", "|---|---|---|"]
        lines += [f"| {r.num} | `{_overrides_str(r)}` | {why} |" for r, why in sweep.excluded]
        lines += [""]
    if sweep.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in sweep.warnings] + [""]
    return lines


def _print_table(result: dict, sweep: Sweep, metric: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # escape: overrides and errors may hold [brackets] that rich would read as markup
    # piped or captured output: a wide console rather than rich's 80-column default, so that
    # the table is not wrapped into unreadable cells in logs
    console = Console() if sys.stdout.isatty() else Console(width=200)
    table = Table(title=escape(f"{sweep.root}  ({metric})"))
    for h in result["header"]:
        table.add_column(escape(h), overflow="fold")
    for row in result["cells"]:
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    if result["fit"] is not None:
        console.print(escape(f"power law: {result['fit']}  ({result['fit'].method})"))
    for w in sweep.warnings:
        console.print("[yellow]warning:[/yellow] " + escape(w))
    for r in sweep.runs:
        if r.status == "failed":
            what = f" job {r.num} ({_overrides_str(r)}): {_short(r.error, 160)}"
            console.print("[red]failed[/red]" + escape(what))
    written = [result["report"], *result["plots"].values()]
    console.print(escape("wrote " + ", ".join(str(p) for p in written)))


# key=value, as every other entry point takes its options (the --flag form still works)
_KEYS = {"dir", "metric", "baseline", "out", "scaling", "band"}


def _hydra_style(argv: list[str]) -> list[str]:
    """`dir=D metric=val/loss baseline=pos=learned scaling=true` -> argparse's spelling."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in _KEYS:
            out.append(arg)
        elif key == "dir":
            out.append(value)
        elif key == "scaling":
            flag = {"true": "--scaling", "false": "--no-scaling", "null": None}.get(value.lower())
            if value.lower() not in ("true", "false", "null"):
                raise TinyLLMError(f"scaling={value!r}: use scaling=true, false or null (auto).")
            out += [flag] if flag else []
        else:
            out += [f"--{key}", value]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tinyllm.report",
        description="Summarise a Hydra multirun folder: table over seeds, curves, report.md. "
        "Options as key=value (dir=DIR metric=val/loss out=DIR scaling=true band=std "
        "baseline=pos=learned), like the other entry points; --metric X etc. also work.",
    )
    p.add_argument("dir", metavar="DIR", help="multirun folder, e.g. outputs/multirun/DATE/TIME")
    p.add_argument("--metric", default="val/bpb", help="metric to compare (default: val/bpb)")
    p.add_argument(
        "--baseline",
        default=None,
        help='swept values of the baseline, e.g. "pos=learned,norm=layernorm" '
        "(default: the first configuration in sweep order)",
    )
    p.add_argument("--out", default=None, help="folder for report.md and PNGs (default: DIR)")
    p.add_argument(
        "--scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add final metric vs params with a power-law fit (default: on when "
        "the only swept key is `model`)",
    )
    p.add_argument(
        "--band",
        choices=("minmax", "std"),
        default="minmax",
        help="band around the mean curve over seeds (default: minmax)",
    )
    return p.parse_args(_hydra_style(sys.argv[1:] if argv is None else list(argv)))


def main(argv: list[str] | None = None) -> int:
    """Returns 0; a user error exits with code 2 through the one handler (tinyllm.errors)."""
    with exit_on_user_error():
        args = parse_args(argv)
        sweep = load_sweep(args.dir, metric=args.metric)
        result = build_report(
            sweep,
            metric=args.metric,
            baseline=args.baseline,
            out_dir=Path(args.out) if args.out else None,
            scaling=args.scaling,
            band=args.band,
        )
    _print_table(result, sweep, args.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
