"""Read a Hydra multirun folder into runs, and group runs over seeds into configurations.

A multirun folder (`outputs/multirun/<date>/<time>/`) holds `multirun.yaml` (the sweep as
launched) and one folder per job, `<n>/`, with `.hydra/{config,overrides}.yaml`, `metrics.json`
(written by tinyllm.train; see INTERFACES.md "Run outputs") and TensorBoard events under `tb/`.

The swept keys are the override keys that vary across jobs (or that multirun.yaml declares as a
sweep), minus seed keys: jobs that differ only in `seed`, `data_seed`, `init_seed`, ... are
repeats of one configuration, and their spread is what the significance test is about.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tinyllm.errors import TinyLLMError

# completed, or stopped early by SIGTERM/SIGINT (resumable); failed; degraded (finished with a
# non-finite validation loss); running; stale (says running, but its process is gone: a kill -9)
STATUSES = ("completed", "interrupted", "failed", "degraded", "running", "stale")
STALE_AFTER_S = 600.0  # a "running" job whose heartbeat is older than this (and than 3
# heartbeat intervals) is stale; on the job's own host a dead pid tells at once


def is_stale(metrics: dict[str, Any], now: float | None = None) -> bool:
    """A metrics.json that says running although its writer is gone (killed by -9 or a node
    failure, which no handler can record): its pid is dead on this host, or its heartbeat
    (written every heartbeat_every_s by the training process) has stopped."""
    if str(metrics.get("status") or "running") != "running":
        return False
    pid, host = metrics.get("pid"), metrics.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        return not _pid_alive(pid)
    beat = _finite(metrics.get("heartbeat"))
    if beat is None:
        return False  # (written before heartbeats were recorded: cannot tell)
    every = _finite(metrics.get("heartbeat_every_s")) or 0.0
    age = (time.time() if now is None else now) - beat
    return age > max(STALE_AFTER_S, 3 * every)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process / not a pid
        return True
    return True


def is_seed_key(key: str) -> bool:
    """`seed`, `data_seed`, `train.init_seed`: any key whose last part ends in "seed"."""
    return key.rsplit(".", 1)[-1].lower().endswith("seed")


def split_override(override: str) -> tuple[str, str]:
    """`"+model.n_layer=4"` -> `("model.n_layer", "4")`: a `+`/`++` prefix is not in the key."""
    key, sep, value = str(override).partition("=")
    if not sep:
        return key.strip(), ""
    return key.strip().lstrip("+"), value.strip()


def _top_level_split(value: str) -> list[str]:
    """Split a Hydra override value on commas that are not inside brackets or quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def sweep_size(value: str) -> int | None:
    """How many values a sweep override expands to: 1 for a plain value, None if unknown."""
    value = str(value).strip()
    m = re.fullmatch(r"range\((-?\d+)\s*(?:,\s*(-?\d+))?\s*(?:,\s*(-?\d+))?\)", value)
    if m:
        a, b, s = (int(g) if g is not None else None for g in m.groups())
        start, stop, step = (0, a, 1) if b is None else (a, b, s or 1)
        return len(range(start, stop, step))
    if re.match(r"(choice|glob|interval|tag|sort|shuffle)\(", value):
        return None
    return len(_top_level_split(value))


@dataclass
class Run:
    """One job of the sweep: where it lives, what it overrode, and what it measured."""

    path: Path
    num: int
    overrides: dict[str, str]
    status: str  # completed | failed | running | unreadable
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # the validation curve of the chosen metric: parallel lists, sorted by step
    steps: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    curve_source: str = ""  # "metrics.json" | "tensorboard" | ""

    def final(self, metric: str) -> float | None:
        """The final value of `metric` for a completed run (None otherwise or when not finite)."""
        if self.status != "completed":
            return None
        return _finite(self.metrics.get(metric))

    def last_value(self, metric: str) -> float | None:
        """The latest value seen so far: metrics.json's, else the curve's last point."""
        v = _finite(self.metrics.get(metric))
        if v is None and self.values:
            v = self.values[-1]
        return v


@dataclass
class Sweep:
    """All runs of a multirun folder, and what was swept."""

    root: Path
    runs: list[Run]
    swept_keys: list[str]
    seed_keys: list[str]
    fixed: dict[str, str]
    command: str | None = None
    expected_jobs: int | None = None
    excluded: list[tuple[Run, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def config_key(self, run: Run) -> tuple[tuple[str, str], ...]:
        return tuple((k, run.overrides.get(k, "")) for k in self.swept_keys)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _job_num(job_dir: Path) -> int | None:
    m = re.match(r"\d+", job_dir.name)
    if m:
        return int(m.group())
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    try:
        return int(_load_yaml(hydra_yaml)["hydra"]["job"]["num"])
    except Exception:  # noqa: BLE001 - any malformed hydra.yaml just leaves the order to the name
        return None


def find_job_dirs(root: Path) -> list[Path]:
    """Direct sub-folders of `root` that hold a `.hydra/` folder, in job-number order."""
    jobs = [p for p in root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    nums = {p: _job_num(p) for p in jobs}
    return sorted(jobs, key=lambda p: (nums[p] is None, nums[p] or 0, p.name))


def _not_a_multirun(root: Path) -> TinyLLMError:
    hint = ""
    if (root / ".hydra").is_dir():
        hint = (
            " It looks like a single run (it has its own .hydra/ folder); the report compares "
            "the jobs of a sweep, so pass the multirun folder that holds numbered job folders, "
            "e.g. outputs/multirun/<date>/<time>."
        )
    else:
        below = [*root.glob("*"), *root.glob("*/*")]  # outputs/multirun/<date>[/<time>]
        nested = sorted(p for p in below if (p / "multirun.yaml").is_file())
        if nested:
            shown = ", ".join(str(p) for p in nested[:5])
            hint = f" Multirun folders found below it: {shown}; pass one of them."
        else:
            hint = (
                " Run a sweep first, e.g. `python -m tinyllm.train -m pos=learned,rope "
                "seed=0,1,2`, then pass its folder outputs/multirun/<date>/<time>."
            )
    return TinyLLMError(
        f"{root} is not a Hydra multirun folder: none of its sub-folders holds a .hydra/ folder "
        f"(the job folders 0/, 1/, ... that `python -m tinyllm.train -m ...` writes).{hint}"
    )


def _read_overrides(job_dir: Path, metrics: dict[str, Any]) -> list[str] | None:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        try:
            data = _load_yaml(path)
        except yaml.YAMLError:
            data = None
        if isinstance(data, list):
            return [str(o) for o in data]
        if data is None and path.stat().st_size == 0:
            return []
    if isinstance(metrics.get("overrides"), list):
        return [str(o) for o in metrics["overrides"]]
    return None


def _read_metrics(job_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(status, metrics, problem) for one job; no metrics.json yet means running."""
    path = job_dir / "metrics.json"
    if not path.is_file():
        return "running", {}, None
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return "unreadable", {}, f"{path}: not valid JSON ({e})"
    if not isinstance(metrics, dict):
        return "unreadable", {}, f"{path}: expected a JSON object, got {type(metrics).__name__}"
    status = str(metrics.get("status") or "running")
    if is_stale(metrics):
        status = "stale"
    return status, metrics, None


def _curve_from_history(metrics: dict[str, Any], metric: str) -> tuple[list, list, list]:
    points = {}
    for h in metrics.get("history") or []:
        if not isinstance(h, dict):
            continue
        step, value = _finite(h.get("step")), _finite(h.get(metric))
        if step is None or value is None:
            continue
        t = _finite(h.get("time_s"))
        points[step] = (t if t is not None else math.nan, value)  # a repeated step: keep last
    steps = sorted(points)
    return steps, [points[s][0] for s in steps], [points[s][1] for s in steps]


def read_tb_curve(tb_dir: Path, metric: str) -> tuple[list, list, list]:
    """(steps, seconds since the run's first event, values) of scalar `metric` from TensorBoard.

    Lightning writes events under tb/<name>/version_<k>/; every folder holding event files is
    read, and a step logged twice (a resumed run) keeps its latest value.
    """
    if not tb_dir.is_dir():
        return [], [], []
    event_dirs = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        return [], [], []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = (metric, metric.replace("/", "_"))
    points: dict[float, tuple[float, float]] = {}
    start = math.inf
    for d in event_dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        available = acc.Tags().get("scalars", [])
        for tag in available:  # the run's start: its first scalar event of any tag
            events = acc.Scalars(tag)
            if events:
                start = min(start, min(e.wall_time for e in events))
        tag = next((t for t in tags if t in available), None)
        if tag is None:
            continue
        for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            if math.isfinite(e.value):
                points[float(e.step)] = (e.wall_time, float(e.value))
    steps = sorted(points)
    return steps, [points[s][0] - start for s in steps], [points[s][1] for s in steps]


def load_run(job_dir: Path, num: int, metric: str) -> tuple[Run | None, str | None]:
    """Read one job folder; (None, why) when it cannot be placed in the sweep."""
    status, metrics, problem = _read_metrics(job_dir)
    overrides = _read_overrides(job_dir, metrics)
    if overrides is None:
        return None, f"{job_dir}: no readable .hydra/overrides.yaml (a YAML list of overrides)"
    run = Run(
        path=job_dir,
        num=num,
        overrides=dict(split_override(o) for o in overrides),
        status=status,
        metrics=metrics,
        error=metrics.get("error") or problem,
    )
    steps, times, values = _curve_from_history(metrics, metric)
    source = "metrics.json" if steps else ""
    if not steps:
        steps, times, values = read_tb_curve(job_dir / "tb", metric)
        source = "tensorboard" if steps else ""
    run.steps, run.times, run.values, run.curve_source = steps, times, values, source
    return run, None


def _declared_sweep(root: Path) -> tuple[dict[str, str], str | None, list[str]]:
    """{key: sweep value} declared in multirun.yaml (command line and sweeper params)."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return {}, None, [f"{path} is missing: the swept keys are inferred from the job folders"]
    try:
        cfg = _load_yaml(path) or {}
        hydra = cfg.get("hydra") or {}
    except (yaml.YAMLError, AttributeError) as e:
        return {}, None, [f"{path} could not be read ({e}); swept keys inferred from the jobs"]
    declared: dict[str, str] = {}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    if isinstance(params, dict):
        for k, v in params.items():  # a YAML list is the same sweep as "a,b,c"
            v = ",".join(str(x) for x in v) if isinstance(v, list) else str(v)
            declared[str(k).lstrip("+")] = v
    task = (hydra.get("overrides") or {}).get("task") or []
    declared.update(split_override(o) for o in task)  # the command line wins over params
    job_name = (hydra.get("job") or {}).get("name") or "train"
    command = f"python -m tinyllm.{job_name} -m " + " ".join(str(o) for o in task)
    return declared, command.strip(), []


def load_sweep(root: str | Path, metric: str = "val/bpb") -> Sweep:
    """Read every job of the multirun folder `root`; raises TinyLLMError when it is not one."""
    root = Path(root)
    if not root.is_dir():
        raise TinyLLMError(
            f"{root} does not exist or is not a folder: pass the multirun folder of a sweep, "
            "e.g. outputs/multirun/<date>/<time>."
        )
    job_dirs = find_job_dirs(root)
    if not job_dirs:
        raise _not_a_multirun(root)
    declared, command, warnings = _declared_sweep(root)
    runs = _load_runs(job_dirs, metric, warnings)
    runs, excluded = _drop_incompatible(runs, root, warnings)
    swept, seed_keys, fixed = _swept_keys(runs, declared)
    expected = None
    if declared:
        sizes = [sweep_size(v) for v in declared.values()]
        if all(s is not None for s in sizes):
            expected = int(np.prod(sizes))
    return Sweep(
        root=root,
        runs=runs,
        swept_keys=swept,
        seed_keys=seed_keys,
        fixed=fixed,
        command=command,
        expected_jobs=expected,
        excluded=excluded,
        warnings=warnings,
    )


def _load_runs(job_dirs: list[Path], metric: str, warnings: list[str]) -> list[Run]:
    runs: list[Run] = []
    for i, d in enumerate(job_dirs):
        num = _job_num(d)
        run, why = load_run(d, num if num is not None else i, metric)
        if run is None:
            warnings.append(f"skipped {why}")
        else:
            runs.append(run)
            if run.status == "unreadable":
                warnings.append(run.error or f"{d}/metrics.json unreadable")
    return runs


def _keyset(r: Run) -> frozenset[str]:
    return frozenset(k for k in r.overrides if not is_seed_key(k))


def _drop_incompatible(
    runs: list[Run], root: Path, warnings: list[str]
) -> tuple[list[Run], list[tuple[Run, str]]]:
    """Two sweeps written into one folder: the jobs' key sets differ. Keep the most common key
    set (ties: the first job's) and say which jobs were left out."""
    if not runs:
        return runs, []
    counts = Counter(_keyset(r) for r in runs)
    if len(counts) == 1:
        return runs, []
    best = max(counts.values())
    main = next(_keyset(r) for r in runs if counts[_keyset(r)] == best)
    excluded: list[tuple[Run, str]] = []
    for r in runs:
        if _keyset(r) != main:
            extra, missing = sorted(_keyset(r) - main), sorted(main - _keyset(r))
            parts = [f"add {extra}" if extra else "", f"lack {missing}" if missing else ""]
            excluded.append((r, "overrides " + ", ".join(s for s in parts if s)))
    warnings.append(
        f"{len(excluded)} job(s) in {root} were launched with different override keys "
        f"than the other {len(runs) - len(excluded)} (mixed, incompatible sweeps in one "
        "folder); they are listed under 'Excluded jobs' and left out of the table. "
        "Give each sweep its own folder (the default, or hydra.sweep.dir=...)."
    )
    return [r for r in runs if _keyset(r) == main], excluded


def _swept_keys(
    runs: list[Run], declared: dict[str, str]
) -> tuple[list[str], list[str], dict[str, str]]:
    """(swept keys, seed keys, fixed values): declared as sweeps or varying across jobs, in
    the order of the overrides."""
    order: list[str] = []
    for r in runs:
        order += [k for k in r.overrides if k not in order]
    varying = {k for k in order if len({r.overrides.get(k) for r in runs}) > 1}
    swept_declared = {k for k, v in declared.items() if (sweep_size(v) or 2) > 1}
    swept = [k for k in order if (k in varying or k in swept_declared)]
    seed_keys = [k for k in swept if is_seed_key(k)]
    swept = [k for k in swept if not is_seed_key(k)]
    fixed = {
        k: runs[0].overrides.get(k, "")
        for k in order
        if k not in varying and k not in swept and k not in seed_keys
    }
    return swept, seed_keys, fixed
