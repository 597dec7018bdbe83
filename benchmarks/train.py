"""Training throughput: tinyllm's Lightning run vs plain PyTorch loops, same model and data.

Three sides, each in a fresh process, in rounds (plain, plain-tuned, tinyllm, plain, ...) so
drift in the machine's speed hits all of them:

- plain: what nanoGPT's train.py does on a CPU: sample random windows from the memmap,
  forward, backward, clip, AdamW step (its default multi-tensor `foreach` kernel, since
  nanoGPT asks for the fused one on CUDA only), with the process's default C allocator.
- plain_tuned: the same loop given tinyllm's runtime choices (fused AdamW, the tuned glibc
  allocator of tinyllm/perf.py). tinyllm / plain_tuned is what Lightning's loop and
  tinyllm's callbacks still cost.
- tinyllm: the real entry point (`python -m tinyllm.train`), whose metrics.json reports
  train/tokens_per_s over training time only (validation excluded).

All run the same number of steps and are timed over all of them; the plain loops' figures
after their warm-up steps are reported too. Same model config, batch and context (nanoGPT's
CPU shape: 4 layers, 4 heads, 128 wide, context 64, batch 12), and the precision that
`trainer.precision=auto` picks. Ratios are medians of the per-round ratios.

Then the interleaved comparison (`--interleaved-runs`, default 2): one process runs the real
entry point with a probe callback that, after every WINDOW Lightning steps, runs WINDOW
plain_tuned steps on its own copy of the model. Separate processes on a shared machine drift
by several percent between runs; side by side in one process, window by window, both sides
see the same machine, allocator and threads, so this is the tightest figure of what Lightning
and tinyllm's callbacks cost. Prints JSON.

    python benchmarks/train.py [--steps 300] [--repeats 3] [--interleaved-runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
BATCH = 12
WINDOW = 10  # steps per throughput window (tinyllm's default trainer.log_every_n_steps)


def prepared_dir(data_path: str | None, vocab: int, root: Path) -> Path:
    from tinyllm.data.prepare import default_data_dir, prepare_data

    if data_path:
        data_cfg = {"name": "bench_text", "source": "text", "path": data_path}
    else:
        data_cfg = {"name": "pydocs", "source": "pydocs"}
    tok_cfg = {"vocab_size": vocab, "pattern": "gpt4", "path": None}
    out = default_data_dir(data_cfg, tok_cfg, root)
    return prepare_data(data_cfg, tok_cfg, out)


class PlainLoop:
    """nanoGPT's CPU training step on our GPT: random windows from the memmap, forward,
    backward, clip, AdamW step."""

    def __init__(self, data_dir: Path, total_steps: int, precision: str, fused: bool) -> None:
        from tinyllm.data.prepare import read_meta
        from tinyllm.model import GPT, ModelConfig
        from tinyllm.module import OptimConfig, lr_factor

        meta = read_meta(data_dir)
        self.data = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
        torch.manual_seed(1337)
        self.model = GPT(ModelConfig(vocab_size=meta["vocab_size"], **SHAPE))
        self.ocfg = OptimConfig(max_steps=total_steps)
        self.lr_factor = lr_factor
        kernel = {"fused": True} if fused else {"foreach": True}
        self.opt = torch.optim.AdamW(
            self.model.param_groups(self.ocfg.weight_decay),
            lr=self.ocfg.lr,
            betas=(0.9, 0.95),
            **kernel,
        )
        self.rng = np.random.default_rng(0)
        self.bf16 = precision.startswith("bf16")
        self.it = 0

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = SHAPE["block_size"]
        ix = self.rng.integers(0, len(self.data) - T - 1, BATCH)
        w = np.stack([self.data[i : i + T + 1] for i in ix]).astype(np.int64)  # (B, T+1)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    def step(self) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.ocfg.lr * self.lr_factor(self.it, self.ocfg)
        x, y = self.get_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1


def plain_loop(
    data_dir: Path, steps: int, warmup: int, precision: str, fused: bool = False
) -> tuple[float, float, float]:
    """tokens/s over all steps (as tinyllm's figure), after warm-up, and the median over
    windows of WINDOW steps (as tinyllm's train/tokens_per_s_median)."""
    loop = PlainLoop(data_dir, steps + warmup, precision, fused)
    tokens = BATCH * SHAPE["block_size"]
    t_start = time.perf_counter()
    t0 = t_window = t_start
    windows = []
    for it in range(steps + warmup):
        if it == warmup:
            t0 = time.perf_counter()
        if it and it % WINDOW == 0:
            now = time.perf_counter()
            windows.append(WINDOW * tokens / (now - t_window))
            t_window = now
        loop.step()
    t_end = time.perf_counter()
    return (
        (steps + warmup) * tokens / (t_end - t_start),
        steps * tokens / (t_end - t0),
        statistics.median(windows),
    )


def tinyllm_args(data_dir: Path, steps: int, run_dir: Path) -> list[str]:
    return [
        f"data_dir={data_dir}", "model=micro", f"batch_size={BATCH}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}", "loader.val_windows=8", "sample.max_new_tokens=0",
        "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def tinyllm_run(data_dir: Path, steps: int, workdir: Path, tag: str) -> dict:
    run_dir = workdir / tag
    cmd = [sys.executable, "-m", "tinyllm.train", *tinyllm_args(data_dir, steps, run_dir)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tinyllm run failed:\n{r.stderr[-4000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def plain_run(data_dir: Path, steps: int, warmup: int, precision: str, tuned: bool) -> dict:
    """One plain loop in a fresh process (the allocator setting is per process)."""
    cmd = [
        sys.executable, __file__, "--plain-worker", str(data_dir), "--steps", str(steps),
        "--warmup", str(warmup), "--precision", precision,
    ] + (["--tuned"] if tuned else [])  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plain_worker(args: argparse.Namespace) -> None:
    allocator = "default"
    if args.tuned:
        from tinyllm.perf import allocator_status, tune_cpu_allocator

        tune_cpu_allocator()
        allocator = allocator_status()
    all_steps, after, median = plain_loop(
        Path(args.plain_worker), args.steps, args.warmup, args.precision, fused=args.tuned
    )
    out = {"all": all_steps, "after_warmup": after, "median": median, "allocator": allocator}
    print(json.dumps(out))


def interleaved_worker(args: argparse.Namespace) -> None:
    """One process: the real entry point (`tinyllm.train`'s Hydra main), with one extra
    callback that, after every WINDOW Lightning steps, runs WINDOW steps of the plain loop
    (fused AdamW; the process already has tinyllm's allocator setting) on its own copy of the
    model. Both sides then share the process, its allocator and the machine's speed of the
    moment, so the per-window ratio isolates what Lightning and tinyllm's callbacks cost."""
    import lightning as L

    data_dir, steps = Path(args.interleaved_worker), args.steps
    plain = PlainLoop(data_dir, steps, args.precision, fused=True)

    class Interleave(L.Callback):
        def __init__(self) -> None:
            self.t: float | None = None
            self.n = 0
            self.lightning_s: list[float] = []
            self.plain_s: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.t is None:  # (the first step of each side is a warm-up)
                plain.step()
                self.t = time.perf_counter()
                return
            self.n += 1
            if self.n < WINDOW:
                return
            # everything since the last window: loop, hooks, loggers, progress bar, data
            self.lightning_s.append(time.perf_counter() - self.t)
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                plain.step()
            self.plain_s.append(time.perf_counter() - t0)
            self.n = 0
            self.t = time.perf_counter()

    probe = Interleave()
    trainer_init = L.Trainer.__init__

    def with_probe(self, *a, **kw):
        kw["callbacks"] = [*(kw.get("callbacks") or []), probe]
        trainer_init(self, *a, **kw)

    L.Trainer.__init__ = with_probe  # the one change to the run: the probe callback
    sys.argv = ["tinyllm.train", *tinyllm_args(data_dir, steps, Path(args.run_dir))]
    runpy.run_module("tinyllm.train", run_name="__main__", alter_sys=True)  # as `python -m`
    print(json.dumps({"lightning_s": probe.lightning_s, "plain_s": probe.plain_s}))


def interleaved_run(data_dir: Path, steps: int, precision: str, run_dir: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--interleaved-worker", str(data_dir), "--steps", str(steps),
        "--precision", precision, "--run-dir", str(run_dir),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"interleaved run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def interleaved_summary(windows: list[float], totals: dict[str, float], runs: int) -> dict:
    if not windows:
        return {"runs": 0}
    steps = len(windows) * WINDOW
    return {
        "runs": runs,
        "window_pairs": len(windows),
        "ratio_tinyllm_over_plain_tuned_median": round(statistics.median(windows), 3),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(windows, n=4)],
        "ratio_of_totals": round(totals["plain_s"] / totals["lightning_s"], 3),
        "tinyllm_ms_per_step": round(1000 * totals["lightning_s"] / steps, 2),
        "plain_tuned_ms_per_step": round(1000 * totals["plain_s"] / steps, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--data-path", default=None, help="a text file (default: pydocs corpus)")
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--interleaved-runs", type=int, default=2,
        help="runs of the in-process interleaved comparison (0: skip)",
    )  # fmt: skip
    ap.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    ap.add_argument("--interleaved-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(args)
    if args.interleaved_worker:
        return interleaved_worker(args)
    from tinyllm.train import resolve_precision

    precision = resolve_precision("auto", "cpu", SHAPE["n_embd"])
    sides: dict[str, list[float]] = {"plain": [], "plain_tuned": [], "tinyllm": []}
    after_warmup: dict[str, list[float]] = {"plain": [], "plain_tuned": []}
    medians: dict[str, list[float]] = {"plain": [], "plain_tuned": [], "tinyllm": []}
    runs, allocators = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = prepared_dir(args.data_path, args.vocab, tmp / "data")
        for i in range(args.repeats):
            for side, tuned in (("plain", False), ("plain_tuned", True)):
                r = plain_run(data_dir, args.steps, args.warmup, precision, tuned)
                sides[side].append(r["all"])
                after_warmup[side].append(r["after_warmup"])
                medians[side].append(r["median"])
                allocators[side] = r["allocator"]
            m = tinyllm_run(data_dir, args.steps + args.warmup, tmp, f"run{i}")
            sides["tinyllm"].append(m["train/tokens_per_s"])
            medians["tinyllm"].append(m["train/tokens_per_s_median"])
            allocators["tinyllm"] = m.get("cpu_allocator")
            runs.append({"wall_time_s": m["wall_time_s"], "train_time_s": m["train_time_s"]})
        windows: list[float] = []  # plain time / tinyllm time, per window pair (> 1: faster)
        totals = {"lightning_s": 0.0, "plain_s": 0.0}
        for i in range(args.interleaved_runs):
            r = interleaved_run(data_dir, args.steps + args.warmup, precision, tmp / f"il{i}")
            windows += [p / t for p, t in zip(r["plain_s"], r["lightning_s"])]
            for k in totals:
                totals[k] += sum(r[k])

    def ratio(num: list[float], den: list[float]) -> dict:
        per_round = [a / b for a, b in zip(num, den)]
        return {"median": round(statistics.median(per_round), 3),
                "per_round": [round(v, 3) for v in per_round]}  # fmt: skip

    result = {
        "benchmark": "train_throughput",
        "shape": {**SHAPE, "batch_size": BATCH, "vocab_size": args.vocab},
        "precision": precision,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "steps": args.steps + args.warmup,
        "tokens_per_s": {k: [round(v) for v in vs] for k, vs in sides.items()},
        "tokens_per_s_after_warmup": {k: [round(v) for v in vs] for k, vs in after_warmup.items()},
        "tokens_per_s_window_median": {k: [round(v) for v in vs] for k, vs in medians.items()},
        "allocator": allocators,
        "tinyllm_runs": runs,
        "ratio_tinyllm_over_plain": ratio(sides["tinyllm"], sides["plain"]),
        "ratio_tinyllm_over_plain_after_warmup": ratio(sides["tinyllm"], after_warmup["plain"]),
        "ratio_tinyllm_over_plain_tuned": ratio(sides["tinyllm"], sides["plain_tuned"]),
        "ratio_plain_tuned_over_plain": ratio(sides["plain_tuned"], sides["plain"]),
        "window_median_ratio_tinyllm_over_plain": ratio(medians["tinyllm"], medians["plain"]),
        "window_median_ratio_tinyllm_over_plain_tuned": ratio(
            medians["tinyllm"], medians["plain_tuned"]
        ),
        "interleaved": interleaved_summary(windows, totals, args.interleaved_runs),
        "note": "all sides run `steps` steps and are timed over all of them (tinyllm's figure "
        "includes Lightning's loop, logging, progress bar and checkpoint callbacks); validation "
        "is excluded. plain = nanoGPT's CPU loop (foreach AdamW, default allocator); "
        "plain_tuned = the same loop with fused AdamW and the tuned allocator, so "
        "tinyllm/plain_tuned is the cost of Lightning and tinyllm's callbacks alone. "
        f"window_median ratios compare medians over windows of {WINDOW} steps (robust to "
        "bursts of load on a shared machine). interleaved: one process runs the real entry "
        f"point and, after every {WINDOW} of its steps, {WINDOW} plain_tuned steps on its own "
        "model copy; ratios are plain time / tinyllm time per window pair, so drift in the "
        "machine's speed cancels (the most precise figure of the framework's cost).",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
