"""Training throughput: tinyllm's Lightning run vs plain PyTorch loops, same model and data.

Three sides, each in a fresh process, in rounds (plain, plain-tuned, tinyllm, plain, ...) so
drift in the machine's speed hits all of them:

- plain: what nanoGPT's train.py does on a CPU: sample random windows from the memmap,
  forward, backward, clip, AdamW step (its default multi-tensor `foreach` kernel, since
  nanoGPT asks for the fused one on CUDA only), with the process's default C allocator.
- plain_tuned: the same loop given tinyllm's runtime choices (fused AdamW, the tuned glibc
  allocator of tinyllm/runtime.py). tinyllm / plain_tuned is what Lightning's loop and
  tinyllm's callbacks still cost.
- tinyllm: the real entry point (`python -m tinyllm.train`), whose metrics.json reports
  train/tokens_per_s over training time only (validation excluded).

All run the same number of steps and are timed over all of them; the plain loops' figures
after their warm-up steps are reported too. Same model config, batch and context (nanoGPT's
CPU shape: 4 layers, 4 heads, 128 wide, context 64, batch 12), and the precision that
`trainer.precision=auto` picks. Ratios are medians of the per-round ratios. Prints JSON.

    python benchmarks/train.py [--steps 300] [--repeats 3] [--data-path FILE]
"""

from __future__ import annotations

import argparse
import json
import os
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


def plain_loop(
    data_dir: Path, steps: int, warmup: int, precision: str, fused: bool = False
) -> tuple[float, float, float]:
    """nanoGPT-style loop; tokens/s over all steps (as tinyllm's figure), after warm-up, and
    the median over windows of WINDOW steps (as tinyllm's train/tokens_per_s_median)."""
    from tinyllm.data.prepare import read_meta
    from tinyllm.model import GPT, ModelConfig
    from tinyllm.module import OptimConfig, lr_factor

    meta = read_meta(data_dir)
    data = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
    torch.manual_seed(1337)
    model = GPT(ModelConfig(vocab_size=meta["vocab_size"], **SHAPE))
    ocfg = OptimConfig(max_steps=steps + warmup)
    kernel = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(
        model.param_groups(ocfg.weight_decay), lr=ocfg.lr, betas=(0.9, 0.95), **kernel
    )
    rng = np.random.default_rng(0)
    T = SHAPE["block_size"]
    bf16 = precision.startswith("bf16")

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = rng.integers(0, len(data) - T - 1, BATCH)
        w = np.stack([data[i : i + T + 1] for i in ix]).astype(np.int64)  # (B, T+1)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    t_start = time.perf_counter()
    t0 = t_window = t_start
    windows = []
    for it in range(steps + warmup):
        if it == warmup:
            t0 = time.perf_counter()
        if it and it % WINDOW == 0:
            now = time.perf_counter()
            windows.append(WINDOW * BATCH * T / (now - t_window))
            t_window = now
        for g in opt.param_groups:
            g["lr"] = ocfg.lr * lr_factor(it, ocfg)
        x, y = get_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_end = time.perf_counter()
    return (
        (steps + warmup) * BATCH * T / (t_end - t_start),
        steps * BATCH * T / (t_end - t0),
        statistics.median(windows),
    )


def tinyllm_run(data_dir: Path, steps: int, workdir: Path, tag: str) -> dict:
    run_dir = workdir / tag
    cmd = [
        sys.executable, "-m", "tinyllm.train", f"data_dir={data_dir}", "model=micro",
        f"batch_size={BATCH}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "loader.val_windows=8", "sample.max_new_tokens=0", "trainer.accelerator=cpu",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
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
        from tinyllm.runtime import allocator_status, tune_cpu_allocator

        tune_cpu_allocator()
        allocator = allocator_status()
    all_steps, after, median = plain_loop(
        Path(args.plain_worker), args.steps, args.warmup, args.precision, fused=args.tuned
    )
    out = {"all": all_steps, "after_warmup": after, "median": median, "allocator": allocator}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--data-path", default=None, help="a text file (default: pydocs corpus)")
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(args)
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
        "note": "all sides run `steps` steps and are timed over all of them (tinyllm's figure "
        "includes Lightning's loop, logging, progress bar and checkpoint callbacks); validation "
        "is excluded. plain = nanoGPT's CPU loop (foreach AdamW, default allocator); "
        "plain_tuned = the same loop with fused AdamW and the tuned allocator, so "
        "tinyllm/plain_tuned is the cost of Lightning and tinyllm's callbacks alone. "
        f"window_median ratios compare medians over windows of {WINDOW} steps (robust to "
        "bursts of load on a shared machine).",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
