"""Training throughput: tinyllm's Lightning run vs a plain PyTorch loop, same model and data.

The plain loop is what nanoGPT's train.py does on CPU: sample random windows from the memmap,
forward, backward, clip, AdamW step. The tinyllm side is the real entry point
(`python -m tinyllm.train`), whose metrics.json reports train/tokens_per_s over training time
only (validation excluded). Both run the same number of steps and are timed over all of them;
the plain loop's figure after its warm-up steps is reported too (a stricter comparison). Both
use one process, the same model config, batch and context (nanoGPT's CPU shape: 4 layers,
4 heads, 128 wide, context 64, batch 12), and the precision that `trainer.precision=auto`
picks. Runs alternate (plain, tinyllm, plain, tinyllm, ...) so drift in the machine's speed
hits both sides. Prints JSON.

    python benchmarks/train.py [--steps 300] [--repeats 2] [--data-path FILE]
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


def prepared_dir(data_path: str | None, vocab: int, root: Path) -> Path:
    from tinyllm.data.prepare import default_data_dir, prepare_data

    if data_path:
        data_cfg = {"name": "bench_text", "source": "text", "path": data_path}
    else:
        data_cfg = {"name": "pydocs", "source": "pydocs"}
    tok_cfg = {"vocab_size": vocab, "pattern": "gpt4", "path": None}
    out = default_data_dir(data_cfg, tok_cfg, root)
    return prepare_data(data_cfg, tok_cfg, out)


def plain_loop(data_dir: Path, steps: int, warmup: int, precision: str) -> tuple[float, float]:
    """nanoGPT-style loop; tokens/s over all steps (as tinyllm's figure) and after warm-up."""
    from tinyllm.data.prepare import read_meta
    from tinyllm.model import GPT, ModelConfig
    from tinyllm.module import OptimConfig, lr_factor

    meta = read_meta(data_dir)
    data = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
    torch.manual_seed(1337)
    model = GPT(ModelConfig(vocab_size=meta["vocab_size"], **SHAPE))
    ocfg = OptimConfig(max_steps=steps + warmup)
    opt = torch.optim.AdamW(
        model.param_groups(ocfg.weight_decay), lr=ocfg.lr, betas=(0.9, 0.95), foreach=True
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
    t0 = t_start
    for it in range(steps + warmup):
        if it == warmup:
            t0 = time.perf_counter()
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
    return (steps + warmup) * BATCH * T / (t_end - t_start), steps * BATCH * T / (t_end - t0)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--data-path", default=None, help="a text file (default: pydocs corpus)")
    args = ap.parse_args()
    from tinyllm.train import resolve_precision

    precision = resolve_precision("auto", "cpu", SHAPE["n_embd"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = prepared_dir(args.data_path, args.vocab, tmp / "data")
        plain, plain_warm, ours, runs = [], [], [], []
        for i in range(args.repeats):
            all_steps, after_warmup = plain_loop(data_dir, args.steps, args.warmup, precision)
            plain.append(all_steps)
            plain_warm.append(after_warmup)
            m = tinyllm_run(data_dir, args.steps + args.warmup, tmp, f"run{i}")
            ours.append(m["train/tokens_per_s"])
            runs.append({"wall_time_s": m["wall_time_s"], "train_time_s": m["train_time_s"]})
    result = {
        "benchmark": "train_throughput",
        "shape": {**SHAPE, "batch_size": BATCH, "vocab_size": args.vocab},
        "precision": precision,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "steps": args.steps,
        "plain_pytorch_tokens_per_s": [round(v) for v in plain],
        "plain_pytorch_tokens_per_s_after_warmup": [round(v) for v in plain_warm],
        "tinyllm_tokens_per_s": [round(v) for v in ours],
        "tinyllm_runs": runs,
        "ratio_tinyllm_over_plain": round(statistics.median(ours) / statistics.median(plain), 3),
        "ratio_vs_plain_after_warmup": round(
            statistics.median(ours) / statistics.median(plain_warm), 3
        ),
        "note": "both sides run steps+warmup steps and are timed over all of them (tinyllm's "
        "figure includes Lightning's loop, logging, progress bar and checkpoint callbacks); "
        "validation is excluded on both. ratio_vs_plain_after_warmup compares against the "
        "plain loop timed after its warm-up steps only (stricter).",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
