"""Data benchmark: prepare throughput and loader throughput vs what training consumes; JSON.

    python benchmarks/data.py                  # Gutenberg set from ../shared/data
    python benchmarks/data.py --step-ms 20     # the training step time to compare with
    python benchmarks/data.py --measure-step   # also time the micro model's step here
    python benchmarks/data.py --quick          # Tiny Shakespeare instead (seconds)

Figures:
- prepare: MB/s of raw text through `prepare_data` (scan + encode + write, the tokenizer
  given by path so BPE training is timed separately), with 1 and with all worker processes.
  `tokenizer_train_and_prepare_s`: training the BPE tokenizer (vocab --vocab-size) plus a
  first prepare. CPU seconds of the main process and of the workers are reported too: on a
  shared machine they show whether the work is spread, where wall time cannot.
- loader: tokens/s that TokenBinDataModule's train DataLoader delivers at the default CPU
  configuration (batch 12 x context 64) with 0 and 2 workers, and the ratio to the tokens/s
  one training step consumes: 768 tokens per step at --step-ms (default 20 ms, the default
  CPU configuration's step), and with --measure-step at the micro model's step timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from tinyllm.data.datamodule import TokenBinDataModule
from tinyllm.data.prepare import prepare_data

REPO = Path(__file__).resolve().parents[1]
BATCH, CONTEXT = 12, 64  # conf/train.yaml batch_size x conf/model/micro.yaml block_size


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished worker processes
    return ru.ru_utime + ru.ru_stime


def measure_step_ms(vocab_size: int, steps: int = 20) -> float | None:
    """Mean ms of one AdamW training step of the micro model (4x4x128, context 64) on CPU."""
    try:
        from tinyllm.model import GPT
        from tinyllm.model.config import ModelConfig
    except ImportError:
        return None
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=CONTEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab_size, (BATCH, CONTEXT))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), x.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def loader_tokens_per_s(data_dir: Path, workers: int, batches: int) -> float:
    dm = TokenBinDataModule(data_dir, CONTEXT, BATCH, num_workers=workers, epoch_steps=batches)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost, not throughput
    t0 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += x.numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--quick", action="store_true", help="Tiny Shakespeare instead of Gutenberg")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--step-ms", type=float, default=20.0, help="training step time to compare")
    ap.add_argument("--measure-step", action="store_true", help="also time a micro-model step")
    ap.add_argument("--batches", type=int, default=3000)
    args = ap.parse_args()

    corpus = Path(args.data) / ("tinyshakespeare.txt" if args.quick else "gutenberg_pd14.txt")
    mb = corpus.stat().st_size / 1e6
    cores = len(os.sched_getaffinity(0))
    out: dict = {
        "benchmark": "data",
        "corpus": corpus.name,
        "corpus_mb": round(mb, 3),
        "machine": {"cpus": cores, "python": platform.python_version(), "torch": torch.__version__},
    }
    data = {"source": "text", "name": "bench", "path": str(corpus)}
    with tempfile.TemporaryDirectory() as tmp:
        # the tokenizer once (timed on its own), then encoding with 1 and all workers
        t0 = time.perf_counter()
        first = prepare_data(data, {"vocab_size": args.vocab_size}, Path(tmp) / "w0", True, cores)
        out["tokenizer_train_and_prepare_s"] = round(time.perf_counter() - t0, 2)
        tok = {"path": str(first / "tokenizer.json")}
        prep = {}
        for workers in sorted({1, cores}):
            t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
            d = prepare_data(data, tok, Path(tmp) / f"w{workers}", True, workers)
            dt, main_cpu = time.perf_counter() - t0, time.process_time() - c0
            prep[f"workers_{workers}"] = {
                "seconds": round(dt, 2),
                "mb_per_s": round(mb / dt, 3),
                # CPU seconds: robust on a shared machine (wall time is not)
                "main_cpu_s": round(main_cpu, 2),
                "worker_cpu_s": round(_children_cpu() - k0, 2),
            }
        meta = json.loads((d / "meta.json").read_text())
        out["prepare"] = prep
        out["tokens"] = {s: meta["splits"][s]["tokens"] for s in ("train", "val")}

        # the reference: the default CPU step (12 x 64 tokens) at --step-ms (20 ms), and the
        # micro model's step measured here, on this (possibly shared, loaded) machine
        measured = measure_step_ms(meta["vocab_size"]) if args.measure_step else None
        consumed = BATCH * CONTEXT / (args.step_ms / 1000)
        loader = {}
        for workers in (0, 2):
            tps = loader_tokens_per_s(d, workers, args.batches)
            loader[f"workers_{workers}"] = {
                "tokens_per_s": round(tps),
                "x_training_at_step_ms": round(tps / consumed, 1),
            }
            if measured:
                ratio = tps / (BATCH * CONTEXT / (measured / 1000))
                loader[f"workers_{workers}"]["x_training_measured"] = round(ratio, 1)
        out["loader"] = loader
        out["training_step"] = {
            "batch": BATCH,
            "context": CONTEXT,
            "step_ms": args.step_ms,
            "tokens_per_s": round(consumed),
            "measured_step_ms": round(measured, 2) if measured else None,
        }
        out["loader_target_met"] = loader["workers_0"]["x_training_at_step_ms"] >= 50
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
