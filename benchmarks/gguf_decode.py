"""Decode speed at batch 1 on CPU: llama.cpp on our GGUF export (f32, q8_0) vs tinyllm's own
decode loop (what `python -m tinyllm.generate` runs), same weights, same run, JSON.

Models: Llama-style (rope + rmsnorm + swiglu, no bias), random weights, ~1M parameters
(4 layers, 128 wide, vocab 512) and ~17M (6 layers, 384 wide, vocab 8192), the sizes of
benchmarks/generate.py. Greedy, `--new-tokens` tokens after an 8-token prompt, EOS never
ends a run (the tokenizer has no special tokens). Runs alternate (tinyllm, llama.cpp f32, llama.cpp
q8_0, tinyllm, ...) and the best of `--repeats` is reported, so a noisy neighbour hurts all
sides alike. llama.cpp is reached through llama-cpp-python (`Llama.generate`, temp=0), so its
figure includes that binding's per-token Python overhead, as a Python user would see it.

    python benchmarks/gguf_decode.py [--new-tokens 256] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tinyllm.export_gguf import export_gguf
from tinyllm.model import GPT, ModelConfig
from tinyllm.sampling import generate_ids
from tinyllm.tokenizer import BPETokenizer

SIZES = {
    "llama-1M": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512),
    "llama-17M": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192),
}
LLAMA = dict(norm="rmsnorm", activation="swiglu", pos="rope", bias=False, tie_weights=False)
PROMPT_LEN = 8


def build(size: str, block_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=block_size, **SIZES[size], **LLAMA)).eval()


def time_ours(model: GPT, prompt: list[int], n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = generate_ids(model, torch.tensor([prompt]), n, temperature=0)[0]
    return time.perf_counter() - t0, out


def time_llama(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return time.perf_counter() - t0, out


def bench(size: str, n: int, repeats: int, threads: int | None, folder: Path) -> dict:
    import llama_cpp

    default_threads = torch.get_num_threads()
    nth = threads or default_threads
    torch.set_num_threads(nth)
    try:
        model = build(size, block_size=512)
        # a small trained tokenizer without EOS (no run ends early); the other rows are padding
        tok = BPETokenizer.train(__doc__ * 4, 300, pattern="gpt4", special_tokens=[])
        llms = {}
        for dtype in ("f32", "q8_0"):
            path = export_gguf(model, tok, folder / f"{size}-{dtype}.gguf", dtype)
            llms[dtype] = llama_cpp.Llama(
                model_path=str(path), n_ctx=512, n_threads=nth, n_threads_batch=nth,
                verbose=False,
            )  # fmt: skip
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, 256, (PROMPT_LEN,), generator=g).tolist()
        time_ours(model, prompt, 16)  # warm-up (allocator, kernels, lazy imports)
        for llm in llms.values():
            time_llama(llm, prompt, 16)
        best = {"tinyllm": float("inf"), "f32": float("inf"), "q8_0": float("inf")}
        outs = {}
        for _ in range(repeats):
            t, outs["tinyllm"] = time_ours(model, prompt, n)
            best["tinyllm"] = min(best["tinyllm"], t)
            for dtype, llm in llms.items():
                t, outs[dtype] = time_llama(llm, prompt, n)
                best[dtype] = min(best[dtype], t)
        assert all(len(o) == n for o in outs.values()), {k: len(o) for k, o in outs.items()}
        tps = {k: n / v for k, v in best.items()}
        return {
            "model": size,
            "params": model.num_params(),
            "threads": nth,
            "new_tokens": n,
            "tinyllm_tokens_per_s": round(tps["tinyllm"], 1),
            "llamacpp_f32_tokens_per_s": round(tps["f32"], 1),
            "llamacpp_q8_0_tokens_per_s": round(tps["q8_0"], 1),
            "f32_over_tinyllm": round(tps["f32"] / tps["tinyllm"], 2),
            "q8_0_over_tinyllm": round(tps["q8_0"] / tps["tinyllm"], 2),
            "f32_same_greedy_tokens": outs["f32"] == outs["tinyllm"],
            "q8_0_same_greedy_tokens": outs["q8_0"] == outs["tinyllm"],
        }
    finally:
        torch.set_num_threads(default_threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(SIZES))
    # (1 thread by default: on a busy shared 2-core machine llama.cpp with 2 threads spins on its
    # thread barrier and a run took over 5 minutes instead of seconds)
    ap.add_argument("--threads", default="1", help="comma list: 1, N or default")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import llama_cpp

    result = {
        "benchmark": "gguf",
        "cpu": platform.processor() or platform.machine(),
        "default_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "decode_batch1": [],
    }
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            for th in args.threads.split(","):
                threads = None if th == "default" else int(th)
                row = bench(size, args.new_tokens, args.repeats, threads, Path(d))
                print(json.dumps(row), file=sys.stderr, flush=True)
                result["decode_batch1"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
