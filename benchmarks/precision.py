"""fp32 vs bf16 autocast on this device, per model width: where does bf16-mixed start to pay?

Times a full training step (forward, backward, AdamW) of the GPT at several widths, both
precisions interleaved in the same process, and prints JSON. The crossover width is the rule
behind `trainer.precision=auto` on CPU (CPU_AMX_BF16_MIN_WIDTH and CPU_BF16_MIN_WIDTH in
tinyllm/hardware.py).

    python benchmarks/precision.py [--widths 128 256 512 768] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from tinyllm.model import GPT, ModelConfig


def step_time(model: GPT, opt, x, y, bf16: bool, steps: int) -> float:
    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, oneDNN kernel selection
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512, 768])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        n_head = max(1, width // 64)
        # the presets' shapes: deeper and longer contexts as width grows
        n_layer, block = (4, 64) if width <= 128 else (6, 256) if width <= 384 else (8, 256)
        cfg = ModelConfig(
            vocab_size=args.vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=width
        )
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        x = torch.randint(0, args.vocab, (args.batch, block))
        y = torch.randint(0, args.vocab, (args.batch, block))
        fp32 = step_time(model, opt, x, y, False, args.steps)
        bf16 = step_time(model, opt, x, y, True, args.steps)
        fp32_b = step_time(model, opt, x, y, False, args.steps)  # again: drift check
        fp32 = min(fp32, fp32_b)
        rows.append(
            {
                "n_embd": width,
                "n_layer": n_layer,
                "block_size": block,
                "params_M": round(model.num_params() / 1e6, 2),
                "fp32_ms": round(fp32 * 1e3, 2),
                "bf16_ms": round(bf16 * 1e3, 2),
                "bf16_speedup": round(fp32 / bf16, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    winners = [r["n_embd"] for r in rows if r["bf16_speedup"] > 1.0]
    print(
        json.dumps(
            {
                "benchmark": "precision",
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "rows": rows,
                "bf16_faster_from_width": min(winners) if winners else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
