"""The optimizer study's figures beyond `tinyllm.report`'s table: per configuration the LR, the
steps each run reached in its wall-time budget, and the time to reach a fixed val/bpb; then
Welch's test of the best Muon against the best AdamW configuration. Prints JSON.

    python experiments/optimizers/summarize.py outputs/multirun/<date>/<time> [--target 2.6]
"""

from __future__ import annotations

import argparse
import json
import statistics

from tinyllm.analysis import load_sweep, summarize
from tinyllm.analysis.stats import time_to_reach, welch_p_value


def _mean_std(xs: list[float]) -> list[float | None]:
    if not xs:
        return [None, None]
    return [round(statistics.mean(xs), 4), round(statistics.stdev(xs), 4) if len(xs) > 1 else None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--target", type=float, default=2.6, help="val/bpb to reach")
    ap.add_argument("--metric", default="val/bpb")
    args = ap.parse_args()
    sweep = load_sweep(args.dir, metric=args.metric)
    rows = []
    for r in summarize(sweep, args.metric):
        done = [run for run in r.runs if run.status == "completed"]
        reach = [time_to_reach(run.times, run.values, args.target) for run in done]
        cfg = done[0].metrics.get("config", {}) if done else {}
        rows.append(
            {
                "config": r.label,
                "optim": cfg.get("optim", {}).get("name"),
                "lr": cfg.get("optim", {}).get("lr"),
                "n": r.n,
                "val_mean_std": _mean_std(r.finals),
                "finals": list(r.finals),  # unrounded: the Welch test below reads them
                "steps": [run.metrics.get("step") for run in done],
                "tokens_per_s": [run.metrics.get("train/tokens_per_s") for run in done],
                "time_to_target_s": [None if t is None else round(t, 1) for t in reach],
            }
        )
    best = {}
    for row in rows:
        o = row["optim"]
        if row["n"] and (o not in best or row["val_mean_std"][0] < best[o]["val_mean_std"][0]):
            best[o] = row
    out = {"dir": args.dir, "target": args.target, "rows": rows}
    if {"adamw", "muon"} <= set(best):
        a, m = best["adamw"], best["muon"]
        out["best_adamw"], out["best_muon"] = a["config"], m["config"]
        delta = statistics.mean(m["finals"]) - statistics.mean(a["finals"])
        out["delta_muon_minus_adamw"] = round(delta, 4)
        out["welch_p"] = welch_p_value(m["finals"], a["finals"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
