"""What Newton-Schulz costs on this CPU: a training step with AdamW vs with Muon.

For each model preset, builds one GPT and both optimizers over it (tinyllm.optim, the same
code `optim=adamw|muon` runs) and times, interleaved round by round in one process so that
machine load hits both alike: the optimizer step alone, and a full step (forward, backward,
optimizer). Prints JSON; medians over rounds.

    python benchmarks/optim.py [--models micro small] [--rounds 5] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from tinyllm.model import GPT, ModelConfig
from tinyllm.optim import OptimConfig, build_optimizer, param_roles

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def _times(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> tuple:
    """Seconds per optimizer step and per full step (wall clock), and this process's CPU
    seconds per full step (less sensitive to other jobs on a shared machine)."""
    t_opt = t_all = 0.0
    c0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), x.reshape(-1)
        )
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        t_opt += t2 - t1
        t_all += t2 - t0
    return t_opt / steps, t_all / steps, (time.process_time() - c0) / steps


def bench(name: str, vocab: int, batch: int, rounds: int, steps: int) -> dict:
    preset = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_dict({**preset, "vocab_size": vocab}))
    roles = param_roles(model)
    opts = {
        o: build_optimizer(model.named_parameters(), roles, OptimConfig(name=o))
        for o in ("adamw", "muon")
    }
    x = torch.randint(0, vocab, (batch, preset["block_size"]))
    for opt in opts.values():  # warm-up: allocator, kernel selection, optimizer state
        _times(model, opt, x, 2)
    got: dict[str, dict[str, list[float]]] = {o: {"opt": [], "step": [], "cpu": []} for o in opts}
    for _ in range(rounds):
        for o, opt in opts.items():
            for key, value in zip(("opt", "step", "cpu"), _times(model, opt, x, steps)):
                got[o][key].append(value)
    med = {o: {k: statistics.median(v) for k, v in d.items()} for o, d in got.items()}
    hidden = sum(p.numel() for n, p in model.named_parameters() if roles[n] == "hidden")
    return {
        "model": name,
        "params": model.num_params(),
        "muon_params": hidden,
        "batch": batch,
        "block_size": preset["block_size"],
        "adamw_opt_ms": round(med["adamw"]["opt"] * 1e3, 2),
        "muon_opt_ms": round(med["muon"]["opt"] * 1e3, 2),
        "adamw_step_ms": round(med["adamw"]["step"] * 1e3, 1),
        "muon_step_ms": round(med["muon"]["step"] * 1e3, 1),
        "adamw_step_cpu_ms": round(med["adamw"]["cpu"] * 1e3, 1),
        "muon_step_cpu_ms": round(med["muon"]["cpu"] * 1e3, 1),
        "step_ratio_muon_over_adamw": round(med["muon"]["step"] / med["adamw"]["step"], 3),
        "cpu_ratio_muon_over_adamw": round(med["muon"]["cpu"] / med["adamw"]["cpu"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["micro", "small"])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(m, args.vocab, args.batch, args.rounds, args.steps) for m in args.models]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
