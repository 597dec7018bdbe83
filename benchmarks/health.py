"""What run-health telemetry costs: tokens/s with `health` on (the defaults) vs off.

Two measures, printed as JSON:

1. In-run share (robust to a loaded machine): the "on" runs time every call of the health
   callback's hooks with perf_counter; the share is that time over the run's training time.
   Both sides of the ratio see the same machine at the same moment.
2. Whole-run ratio: same process, same prepared corpus (the embedded pydocs corpus),
   model=micro on the CPU, runs in ABBA order (off, on, on, off, ...) so drift of a shared
   machine hits both sides alike; each run reports train/tokens_per_s_median (median over
   logging windows, validation excluded). On a busy shared machine this ratio scatters by
   more than the cost it measures; the in-run share does not.

    python benchmarks/health.py [--steps 300] [--rounds 2] [--every 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' in-process runner (composes real configs)


HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_end",
)
HOOK_TIME = [0.0]


def _timed_monitor():
    """The real HealthMonitor with every hook timed (perf_counter, summed in HOOK_TIME)."""
    import time

    import tinyllm.health as health

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                HOOK_TIME[0] += time.perf_counter() - t0

        return wrapper

    cls = type("TimedHealthMonitor", (health.HealthMonitor,), {})
    for name in HOOKS:
        setattr(cls, name, timed(getattr(health.HealthMonitor, name)))
    return cls


def run(steps: int, extra: list[str], root: Path, tag: str) -> dict:
    from train_utils import read_metrics, train_in_process

    import tinyllm.health as health

    original = health.HealthMonitor
    health.HealthMonitor = _timed_monitor()
    HOOK_TIME[0] = 0.0

    ov = [
        "model=micro",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "loader.val_windows=8",
        "sample.max_new_tokens=0",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"data_root={root / 'data'}",
        *extra,
    ]
    try:
        train_in_process(ov, root / tag)
    finally:
        health.HealthMonitor = original
    m = read_metrics(root / tag)
    return {
        "tps": float(m["train/tokens_per_s_median"]),
        "hook_share": HOOK_TIME[0] / float(m["train_time_s"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--every", type=int, default=50, help="health.every_n_steps of the 'on' side")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    off = ["health.every_n_steps=null", "health.spikes=false"]
    on = [f"health.every_n_steps={args.every}"]
    ratios, tps, shares = [], {"on": [], "off": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(20, off, root, "warmup")  # prepares the corpus, warms caches
        for r in range(args.rounds):
            order = [("off", off), ("on", on)] if r % 2 == 0 else [("on", on), ("off", off)]
            got = {name: run(args.steps, ov, root, f"{r}-{name}") for name, ov in order}
            tps["on"].append(got["on"]["tps"])
            tps["off"].append(got["off"]["tps"])
            shares.append(got["on"]["hook_share"])
            ratios.append(got["on"]["tps"] / got["off"]["tps"])
    print(
        json.dumps(
            {
                "benchmark": "health_overhead",
                "model": "micro",
                "steps": args.steps,
                "every_n_steps": args.every,
                "tokens_per_s_on": [round(v) for v in tps["on"]],
                "tokens_per_s_off": [round(v) for v in tps["off"]],
                "hook_time_share_percent_per_run": [round(100 * v, 3) for v in shares],
                "hook_time_share_percent_max": round(100 * max(shares), 3),
                "ratio_on_off_per_round": [round(v, 4) for v in ratios],
                "ratio_on_off_median": round(statistics.median(ratios), 4),
                "cost_percent_median": round(100 * (1 - statistics.median(ratios)), 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
