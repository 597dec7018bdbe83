"""The evaluation's output: a rich table on stdout and, with out=, one JSON with everything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def print_tables(result: dict[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # piped or captured output: a wide console, not rich's 80 columns that wrap every cell
    console = Console() if sys.stdout.isatty() else Console(width=160)
    text = result.get("text")
    if text:
        t = Table(title=f"text={text['spec']}  (windows: {text['windows']}; {text['prefix']})")
        for col in ("file", "tokens", "bytes", "bits/byte", "nats/token", "perplexity"):
            t.add_column(col, justify="left" if col == "file" else "right")
        rows = text["files"] + ([text["total"]] if len(text["files"]) > 1 else [])
        for r in rows:
            name = r["name"] + (" (invalid UTF-8 replaced)" if r.get("bad_utf8") else "")
            t.add_row(
                name,
                str(r["tokens"]),
                str(r["bytes"]),
                _f(r["bpb"]),
                _f(r["nats_per_token"]),
                _f(r["perplexity"], 2),
            )
        console.print(t)
    tasks = result.get("tasks")
    if tasks:
        t = Table(title="multiple choice (95% bootstrap intervals)")
        for col in ("task", "items", "acc", "acc 95% CI", "acc_norm", "acc_norm 95% CI", "chance"):
            t.add_column(col, justify="left" if col == "task" else "right")
        for name, m in tasks.items():
            ci, cin = m["acc_ci95"], m["acc_norm_ci95"]
            t.add_row(
                name,
                str(m["items"]),
                _f(m["acc"]),
                f"[{_f(ci[0], 3)}, {_f(ci[1], 3)}]",
                _f(m["acc_norm"]),
                f"[{_f(cin[0], 3)}, {_f(cin[1], 3)}]",
                _f(m["chance"]),
            )
        console.print(t)
    harness = result.get("harness")
    if harness:
        t = Table(title="lm-evaluation-harness (model: tinyllm)")
        for col in ("task", "metric", "value"):
            t.add_column(col)
        for task, metrics in harness.get("results", {}).items():
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    t.add_row(task, k, _f(float(v)))
        console.print(t)


def _plain(x: Any) -> Any:
    """JSON-ready: tuples become lists, paths strings. Non-finite floats stay as they are:
    write_json_atomic writes them as "NaN"/"Infinity", like metrics.json (null would read as
    "not measured")."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    """Written to a temporary name beside `out`, then renamed: never half a file."""
    from tinyllm.io import write_json_atomic

    return write_json_atomic(out, _plain(result))


def eval_columns(rows: list[Any]) -> tuple[list[str], list[list[str]]]:
    """The eval/* figures of a sweep's runs as report columns: (header, cells per row).

    One column per eval/* key found in any run's metrics.json, the mean ± std over the
    completed seeds of each configuration (as the val/bpb column)."""
    import statistics

    keys = sorted(
        {k for r in rows for run in r.runs for k in run.metrics if str(k).startswith("eval/")}
    )
    cells = []
    for r in rows:
        line = []
        for k in keys:
            vals = [v for run in r.runs if (v := run.final(k)) is not None]
            if not vals:
                line.append("—")
            elif len(vals) == 1:
                line.append(f"{vals[0]:.4f} ± n/a")
            else:
                line.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
        cells.append(line)
    return [f"{k} (mean ± std)" for k in keys], cells
