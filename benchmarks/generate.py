"""Decoding speed: tinyllm's KV cache vs recomputing, and tinyllm vs transformers' `generate`.

Two questions, answered in one run, printed as JSON:

1. How much does the KV cache buy? Greedy decoding of 512 new tokens with the cache and with
   full recomputation of the sequence every step (`use_cache=False`); the two outputs must be
   identical token for token.
2. Is our decode loop fast? Decode tokens/s at batch 1, greedy, against Hugging Face
   transformers' `LlamaForCausalLM.generate` on the same architecture and weights (our model
   built Llama-style: rope + rmsnorm + swiglu, no bias, exported with
   `tinyllm.export.export_hf`). Both generate exactly the same number of tokens (EOS
   disabled, min_new_tokens = max_new_tokens), one thread and the default thread count.
   Sizes: ~1M parameters (4 layers, 128 wide, vocab 512) and ~17M (6 layers, 384 wide,
   vocab 8192), random weights. Runs alternate (ours, theirs, ours, ...) and the best of
   `--repeats` is reported, so a noisy neighbour hurts both sides alike. Single-threaded
   rows also report tokens per CPU-second of the process, the steadier figure on a shared
   machine (wall-clock on a busy 2-core box swings by 2x from run to run).

    python benchmarks/generate.py [--new-tokens 256] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings

import torch

from tinyllm.model import GPT, ModelConfig
from tinyllm.sampling import generate_ids

SIZES = {
    "llama-1M": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512),
    "llama-17M": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192),
}
LLAMA = dict(norm="rmsnorm", activation="swiglu", pos="rope", bias=False, tie_weights=False)
PROMPT_LEN = 8


def build(size: str, block_size: int, device: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=block_size, **SIZES[size], **LLAMA)
    return GPT(cfg).to(device).eval()


def to_hf(model: GPT, device: str):
    """The same weights as a transformers LlamaForCausalLM, via our exporter."""
    from transformers import LlamaForCausalLM

    from tinyllm.export import export_hf

    with tempfile.TemporaryDirectory() as d:
        export_hf(model, None, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool = True):
    """(wall seconds, CPU seconds of this process, generated ids)."""
    sync(str(prompt.device))
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate_ids(model, prompt, n, temperature=0, use_cache=use_cache)[0]
    sync(str(prompt.device))
    return time.perf_counter() - t0, time.process_time() - c0, out


@torch.inference_mode()
def time_hf(hf, prompt: torch.Tensor, n: int):
    sync(str(prompt.device))
    t0, c0 = time.perf_counter(), time.process_time()
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
    )
    sync(str(prompt.device))
    return time.perf_counter() - t0, time.process_time() - c0, out[0, prompt.size(1) :].tolist()


def cache_vs_recompute(device: str, n: int, repeats: int = 2) -> dict:
    torch.set_num_threads(1)  # the ratio of two single-thread runs: steadier on a busy machine
    model = build("llama-1M", block_size=PROMPT_LEN + n, device=device)
    prompt = torch.randint(0, 512, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    time_ours(model, prompt, 8)  # warm-up
    t_cache = t_full = float("inf")
    for _ in range(repeats):  # alternate; best of each
        t, _, a = time_ours(model, prompt, n)
        t_cache = min(t_cache, t)
        t, _, b = time_ours(model, prompt, n, use_cache=False)
        t_full = min(t_full, t)
    return {
        "model": "llama-1M",
        "params": model.num_params(),
        "new_tokens": n,
        "kv_cache_s": round(t_cache, 3),
        "recompute_s": round(t_full, 3),
        "speedup": round(t_full / t_cache, 2),
        "identical_greedy_output": a == b,
    }


def decode_vs_hf(size: str, device: str, n: int, repeats: int, threads: int | None) -> dict:
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = build(size, block_size=1024, device=device)
        hf = to_hf(model, device)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=g).to(device)
        time_ours(model, prompt, 16)  # warm-up both (allocator, kernels, lazy imports)
        time_hf(hf, prompt, 16)
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        for _ in range(repeats):  # alternate, so drift in machine speed hits both sides
            t, c, a = time_ours(model, prompt, n)
            ours.append(t)
            ours_cpu.append(c)
            t, c, b = time_hf(hf, prompt, n)
            theirs.append(t)
            theirs_cpu.append(c)
        ours_tps, hf_tps = n / min(ours), n / min(theirs)
        row = {
            "model": size,
            "params": model.num_params(),
            "threads": torch.get_num_threads(),
            "new_tokens": n,
            "tinyllm_tokens_per_s": round(ours_tps, 1),
            "hf_tokens_per_s": round(hf_tps, 1),
            "ratio": round(ours_tps / hf_tps, 2),
            "same_greedy_tokens": a == b,
            "first_divergence": next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None),
        }
        if torch.get_num_threads() == 1:
            # CPU time of a single-threaded run is what the work costs, even when neighbours
            # steal the core; on a busy machine it is the steadier comparison.
            row["tinyllm_tokens_per_cpu_s"] = round(n / min(ours_cpu), 1)
            row["hf_tokens_per_cpu_s"] = round(n / min(theirs_cpu), 1)
            row["ratio_cpu_time"] = round(min(theirs_cpu) / min(ours_cpu), 2)
        return row
    finally:
        torch.set_num_threads(default_threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens per decode run")
    ap.add_argument("--cache-tokens", type=int, default=512, help="for cache vs recompute")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--threads", default="1,default", help="comma list: 1, N or default")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    default_threads = torch.get_num_threads()
    result = {
        "benchmark": "generate",
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "default_threads": default_threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kv_cache_vs_recompute": cache_vs_recompute(
            args.device, args.cache_tokens, max(1, min(args.repeats, 2))
        ),
        "threads_note": "cache vs recompute runs single-threaded",
        "decode_batch1_vs_hf": [],
    }
    torch.set_num_threads(default_threads)
    print(json.dumps(result["kv_cache_vs_recompute"]), file=sys.stderr, flush=True)
    for size in args.sizes.split(","):
        for th in args.threads.split(","):
            row = decode_vs_hf(
                size,
                args.device,
                args.new_tokens,
                args.repeats,
                None if th == "default" else int(th),
            )
            print(json.dumps(row), file=sys.stderr, flush=True)
            result["decode_batch1_vs_hf"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
