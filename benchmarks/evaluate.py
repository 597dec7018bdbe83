"""Multiple-choice scoring speed: tinyllm.evaluate vs lm-evaluation-harness's `hf` model.

One run, one thread, the same requests and weights on both sides, printed as JSON:

- task: a "which passage comes next?" task (tinyllm.eval.nextpassage) of `--items` items x 4
  choices (~300 characters of context, ~100 per choice; every item fits the window),
  cut from the end of Tiny Shakespeare (../shared/data, or --text FILE);
- model: Llama-style (rope + rmsnorm + swiglu, no bias), random weights, a BPE tokenizer of
  512 tokens trained on the text's start; exported with tinyllm.export for the harness;
- measured (items per second, best of --repeats, runs interleaved so a noisy neighbour hurts
  all alike):
    native      tinyllm.eval.score_items (tokenise + the context scored once per item)
    tinyllm_lm  the harness's loglikelihood() through our model class (same scorer)
    hf          the harness's loglikelihood() through HFLM on the exported weights
  plus the largest difference in any choice's log-likelihood between native and hf.

    python benchmarks/evaluate.py [--items 300] [--repeats 3] [--layers 4 --width 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(text: str, layers: int, width: int, block: int):
    from tinyllm.model import GPT, ModelConfig
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(text[:300_000], vocab_size=512, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        block_size=block,
        n_layer=layers,
        n_head=max(1, width // 32),
        n_embd=width,
        norm="rmsnorm",
        activation="swiglu",
        pos="rope",
        bias=False,
    )
    torch.manual_seed(0)
    return GPT(cfg).eval(), tok


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.eval.harness import TinyLLMLM
    from tinyllm.eval.multiple_choice import score_items
    from tinyllm.eval.nextpassage import make_items
    from tinyllm.eval.scoring import Scorer
    from tinyllm.export import run as export

    text = Path(args.text).read_text(encoding="utf-8")
    model, tok = build(text, args.layers, args.width, args.block)
    items = make_items(text[-300_000:], args.items, 4, 300, 100, seed=0)
    requests = [
        Instance("loglikelihood", {}, (it.context, c), i)
        for i, it in enumerate(items)
        for c in it.choices
    ]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "m.ckpt", model, tok)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone
            export(str(Path(tmp) / "m.ckpt"), str(Path(tmp) / "hf"))
        hf = HFLM(
            pretrained=str(Path(tmp) / "hf"),
            dtype="float32",
            device="cpu",
            batch_size=args.batch_size,
        )
        ours = TinyLLMLM(model=model, tokenizer=tok, batch_size=args.batch_size)
        scorer = Scorer(model, tok, batch_size=args.batch_size)
        runs = {
            "native": lambda: [ll for s in score_items(scorer, items) for ll in s.loglikelihoods],
            "tinyllm_lm": lambda: [ll for ll, _ in ours.loglikelihood(requests, True)],
            "hf": lambda: [ll for ll, _ in hf.loglikelihood(requests, True)],
        }
        best = {k: float("inf") for k in runs}
        best_cpu = dict(best)
        results = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                sec, cpu, results[name] = timed(fn)
                best[name], best_cpu[name] = min(best[name], sec), min(best_cpu[name], cpu)
    diff = max(abs(a - b) for a, b in zip(results["native"], results["hf"]))
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "load_avg_1min": round(__import__("os").getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
        "model": {
            "params": sum(p.numel() for p in model.parameters()),
            **{
                k: getattr(model.config, k)
                for k in ("n_layer", "n_embd", "block_size", "vocab_size")
            },
        },
        "items": len(items),
        "choices_per_item": 4,
        "batch_size": args.batch_size,
        "items_per_s": {k: round(len(items) / v, 2) for k, v in best.items()},
        "items_per_cpu_s": {k: round(len(items) / v, 2) for k, v in best_cpu.items()},
        "native_over_hf": round(best["hf"] / best["native"], 2),
        "native_over_hf_cpu": round(best_cpu["hf"] / best_cpu["native"], 2),
        "max_abs_loglik_diff_native_vs_hf": diff,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
