"""Quality per CPU-minute on Tiny Shakespeare: nanoGPT's CPU recipe vs experiment=shakespeare_cpu.

Side by side in one run, on the same machine:
1. nanoGPT's documented CPU recipe (config/train_shakespeare_char.py with the README's CPU
   overrides: char-level, 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations,
   lr 1e-3 cosine to 1e-4 over 2000 iterations with 100 warm-up, AdamW betas (0.9, 0.99),
   weight decay 0.1, clip 1.0, no dropout, no bias), re-implemented as a plain PyTorch loop
   around our GPT with the same architecture (learned positions, layernorm, gelu, tied
   weights). Its wall time (training only, like nanoGPT's timing) sets the budget.
2. `python -m tinyllm.train experiment=shakespeare_cpu data.path=FILE budget.max_time_s=<that>`
   (the experiment's own budget is 50 s, the documented recipe's 52 s less a margin;
   `--budget-s 50` reproduces exactly the committed experiment).

Both are scored the same way: mean loss over every non-overlapping window of the validation
split (the last 10% of the file), in bits per byte (the file is ASCII: a char is a byte).
Prints JSON.

    python benchmarks/shakespeare.py [--data-path ../shared/data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def nanogpt_recipe(text: str, iters: int) -> dict:
    from tinyllm.model import GPT, ModelConfig
    from tinyllm.module import OptimConfig, lr_factor

    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    T, B = 64, 12
    torch.manual_seed(1337)
    cfg = ModelConfig(
        vocab_size=len(chars), block_size=T, n_layer=4, n_head=4, n_embd=128, bias=False
    )
    model = GPT(cfg)
    ocfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=iters)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, betas=(0.9, 0.99), foreach=True)
    rng = np.random.default_rng(1337)
    t0 = time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = ocfg.lr * lr_factor(it, ocfg)
        ix = rng.integers(0, len(train) - T - 1, B)
        w = torch.from_numpy(np.stack([train[i : i + T + 1] for i in ix]))  # (B, T+1)
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    # every non-overlapping window of the val split, like tinyllm's validation
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        starts = np.arange(0, len(val) - T - 1, T)
        for k in range(0, len(starts), 64):
            w = torch.from_numpy(np.stack([val[s : s + T + 1] for s in starts[k : k + 64]]))
            logits = model(w[:, :-1])
            nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += w[:, 1:].numel()
    val_loss = nll / count
    return {
        "train_time_s": round(train_s, 1),
        "iters": iters,
        "val_loss_nats_per_char": round(val_loss, 4),
        "val_bpb": round(val_loss / math.log(2), 4),
    }


def tinyllm_run(data_path: Path, max_time_s: float, workdir: Path, extra: list[str]) -> dict:
    run_dir = workdir / "shakespeare_cpu"
    secs = int(max_time_s)
    cmd = [
        sys.executable, "-m", "tinyllm.train", "experiment=shakespeare_cpu",
        f"data.path={data_path}", f"budget.max_time_s={secs}",
        f"data_root={workdir / 'data'}", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    # prepare first (untimed, as nanoGPT's prepare.py is), then train under the budget
    subprocess.run([*cmd[:5], "trainer.max_steps=1", "trainer.val_check_interval=1",
                    "loader.val_windows=1", f"hydra.run.dir={workdir / 'prep'}",
                    f"data_root={workdir / 'data'}"], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"tinyllm run failed:\n{r.stderr[-4000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {
        "process_wall_s": round(wall, 1),
        "fit_wall_s": m["wall_time_s"],
        "train_time_s": m["train_time_s"],
        "step": m["step"],
        "val_loss_nats_per_token": round(m["val/loss"], 4),
        "val_bpb": round(m["val/bpb"], 4),
        "tokens_per_s": round(m["train/tokens_per_s"]),
        "params": m["params"],
        "precision": m["precision"],  # trainer.precision=auto resolved on this CPU
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-path", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--budget-s", type=float, default=None, help="skip the recipe, use this")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the tinyllm run")
    args = ap.parse_args()
    if not args.data_path.is_file():
        raise SystemExit(f"{args.data_path} not found: pass --data-path (Tiny Shakespeare)")
    text = args.data_path.read_text()
    from tinyllm.hardware import cpu_bf16_units

    result: dict = {"benchmark": "shakespeare_quality_per_cpu_minute",
                    "threads": torch.get_num_threads(),
                    "cpu_bf16_units": cpu_bf16_units()}  # fmt: skip
    if args.budget_s is None:
        load0 = os.getloadavg()[0]
        result["nanogpt_recipe"] = nanogpt_recipe(text, args.iters)
        # a shared machine's load (1-minute average) at the start and end of each side
        result["nanogpt_recipe"]["load_avg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
        budget = result["nanogpt_recipe"]["train_time_s"]
    else:
        budget = args.budget_s
    result["budget_s"] = budget
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()[0]
        result["tinyllm"] = tinyllm_run(args.data_path, budget, Path(tmp), args.overrides)
        result["tinyllm"]["load_avg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
    if "nanogpt_recipe" in result:
        result["bpb_ratio_tinyllm_over_nanogpt"] = round(
            result["tinyllm"]["val_bpb"] / result["nanogpt_recipe"]["val_bpb"], 4
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
