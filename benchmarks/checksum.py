"""What the checkpoint checksum costs: load with and without verification, side by side.

    python benchmarks/checksum.py [--params 30_000_000] [--repeats 3]

Writes a checkpoint shaped like training's (fp32 weights + two AdamW moments), then times,
interleaved in one process: torch.load(weights_only=True) alone, tensors_checksum alone, and
load_trusted_types_only (load + verify). Prints JSON; the figure to read is the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tinyllm.checkpoint import add_checksum, load_trusted_types_only, tensors_checksum
from tinyllm.io import torch_save_atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=30_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.params // 10  # ten weight matrices
    weights = {f"model.w{i}": torch.randn(n) for i in range(10)}
    state = {i: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)} for i in range(10)}
    ckpt = {"state_dict": weights, "optimizer_states": [{"state": state}], "global_step": 1}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "last.ckpt"
        torch_save_atomic(add_checksum(ckpt), path)
        times: dict[str, list[float]] = {"load": [], "checksum": [], "load_and_verify": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            times["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            tensors_checksum(loaded)
            times["checksum"].append(time.perf_counter() - t)
            t = time.perf_counter()
            load_trusted_types_only(path)
            times["load_and_verify"].append(time.perf_counter() - t)
        size = path.stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "file_mb": round(size / 1e6, 1),
                "median_s": {k: round(v, 4) for k, v in med.items()},
                "checksum_gb_per_s": round(size / 1e9 / med["checksum"], 3),
                "verify_over_load": round(med["load_and_verify"] / med["load"], 3),
                "repeats": args.repeats,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
