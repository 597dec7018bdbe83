"""Tokenizer benchmark: tinyllm's BPE side by side with its peers, in one run; prints JSON.

    python -m benchmarks.tokenizer            # full (a few minutes on 2 cores)
    python benchmarks/tokenizer.py --quick    # Tiny Shakespeare only, fewer naive merges

Figures (single thread unless stated; `cpu_s` is process CPU time, robust on a shared machine):
- train: time to train to a vocab size (gpt4 pattern, no specials) for tinyllm, the Rust
  `tokenizers` BpeTrainer (RAYON_NUM_THREADS=1, same pattern, same text as one document), and
  a naive minbpe-style loop that recounts all pairs after every merge (timed for a few merges,
  then extrapolated: marked "extrapolated": true).
- encode: MB/s on the same merges (GPT-2 ranks from gpt2.tiktoken loaded into both tinyllm and
  tiktoken), first call on a fresh tokenizer (cold cache).
- encode_batch: 1 vs 2 worker processes on the same documents (speedup).
- peak RSS while training on the 12.5 MB corpus, measured in a child process.
Corpora come from ../shared/data (or --data DIR).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before `tokenizers` starts its thread pool

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import regex

from tinyllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, read_tiktoken
from tinyllm.tokenizer import train as train_mod

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 3), round(time.process_time() - c0, 3)


def train_hf(text: str, vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def naive_minbpe(text: str, vocab_size: int, measured_merges: int) -> dict:
    """minbpe's RegexTokenizer.train: recount every pair of every chunk after each merge."""
    t0, c0 = time.perf_counter(), time.process_time()
    ids = [list(ch.encode("utf-8")) for ch in regex.findall(GPT4_PATTERN, text)]
    setup_wall, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(measured_merges):
        stats: dict = {}
        for chunk in ids:  # minbpe's get_stats, chunk by chunk
            for pair in zip(chunk, chunk[1:]):
                stats[pair] = stats.get(pair, 0) + 1
        pair = max(stats, key=stats.get)
        ids = [train_mod._merge_word(chunk, *pair, 256 + i) for chunk in ids]
    per_merge_wall = (time.perf_counter() - t1) / measured_merges
    per_merge_cpu = (time.process_time() - c1) / measured_merges
    n = vocab_size - 256
    return {
        "extrapolated": True,
        "measured_merges": measured_merges,
        "per_merge_s": round(per_merge_wall, 4),
        "wall_s": round(setup_wall + per_merge_wall * n, 1),
        "cpu_s": round(setup_cpu + per_merge_cpu * n, 1),
        "note": "setup + per-merge time of the first merges x all merges (later merges are "
        "a little cheaper, so this slightly overestimates)",
    }


def bench_train(name: str, text: str, vocab_size: int, naive_merges: int) -> dict:
    ours, wall, cpu = timed(BPETokenizer.train, text, vocab_size, "gpt4", [])
    hf, hf_wall, hf_cpu = timed(train_hf, text, vocab_size)
    n_bytes = len(text.encode("utf-8"))
    row = {
        "corpus": name,
        "bytes": n_bytes,
        "vocab_size": vocab_size,
        "tinyllm": {"wall_s": wall, "cpu_s": cpu},
        "hf_tokenizers": {"wall_s": hf_wall, "cpu_s": hf_cpu},
        "ratio_cpu_vs_hf": round(cpu / hf_cpu, 2),
        "ratio_wall_vs_hf": round(wall / hf_wall, 2),
    }
    if naive_merges:
        naive = naive_minbpe(text, vocab_size, naive_merges)
        row["naive_minbpe"] = naive
        row["speedup_cpu_vs_naive"] = round(naive["cpu_s"] / cpu, 1)
    if n_bytes < 2_000_000:  # compression on the training text (both encoders, same pattern)
        row["tokens_per_byte"] = {
            "tinyllm": round(len(ours.encode(text)) / n_bytes, 5),
            "hf_tokenizers": round(len(hf.encode(text).ids) / n_bytes, 5),
        }
    return row


def bench_encode(data: Path, text: str, name: str) -> dict:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks_path = data / "gpt2.tiktoken"
    special = {"<|endoftext|>": 50256}
    ours = read_tiktoken(ranks_path, pattern="gpt2", special_tokens=special)
    enc = tiktoken.Encoding(
        "gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
        special_tokens=special,
    )
    mb = len(text.encode("utf-8")) / 1e6
    ids, wall, cpu = timed(ours.encode, text)
    ids_tt, tt_wall, tt_cpu = timed(enc.encode_ordinary, text)
    _, warm_wall, warm_cpu = timed(ours.encode, text)
    return {
        "corpus": name,
        "mb": round(mb, 2),
        "same_ids": ids == ids_tt,
        "tokens": len(ids),
        "tinyllm_mb_per_s": round(mb / wall, 2),
        "tinyllm_mb_per_s_cpu": round(mb / cpu, 2),
        "tinyllm_warm_cache_mb_per_s": round(mb / warm_wall, 2),
        "tiktoken_mb_per_s": round(mb / tt_wall, 2),
        "tiktoken_mb_per_s_cpu": round(mb / tt_cpu, 2),
        "ratio_vs_tiktoken_cpu": round(tt_cpu / cpu, 2),
    }


def bench_batch(text: str, name: str) -> dict:
    tok = BPETokenizer.train(text[:300_000], 4096, "gpt4", [])
    docs = [d for d in text.split("\n\n") if d]
    per = max(1, len(docs) // 256)
    docs = ["\n\n".join(docs[i : i + per]) for i in range(0, len(docs), per)]
    mb = len(text.encode("utf-8")) / 1e6
    out = {"corpus": name, "documents": len(docs), "cores": os.cpu_count()}
    ref = None
    for workers in (1, 2):
        fresh = BPETokenizer.from_dict(tok.to_dict())  # cold cache each time
        ids, wall, _ = timed(fresh.encode_batch, docs, num_workers=workers)
        ref = ref or ids
        out[f"workers_{workers}_mb_per_s"] = round(mb / wall, 2)
        out[f"workers_{workers}_same_as_serial"] = ids == ref
    out["speedup_2_vs_1"] = round(out["workers_2_mb_per_s"] / out["workers_1_mb_per_s"], 2)
    return out


def bench_rss(path: Path, vocab_size: int) -> dict:
    # VmHWM (peak RSS of this process image) from /proc: ru_maxrss would include the parent's
    # size at fork time, since the child starts as a copy of this (large) process.
    code = (
        "import re; from pathlib import Path; from tinyllm.tokenizer import BPETokenizer\n"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "base = hwm()\n"
        f"BPETokenizer.train(Path({str(path)!r}), {vocab_size}, 'gpt4', [])\n"
        "print(base, hwm())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    base_kb, peak_kb = map(int, res.stdout.split())
    return {
        "corpus": path.name,
        "vocab_size": vocab_size,
        "input": "streamed from the file (Path)",
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rss_after_import_mb": round(base_kb / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--quick", action="store_true", help="Tiny Shakespeare only, 5 naive merges")
    ap.add_argument("--naive-merges", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    shakespeare = args.data / "tinyshakespeare.txt"
    gutenberg = args.data / "gutenberg_pd14.txt"
    if not shakespeare.exists():
        sys.exit(f"corpora not found in {args.data} (pass --data DIR)")
    naive = args.naive_merges if args.naive_merges is not None else (5 if args.quick else 20)
    small = shakespeare.read_text(encoding="utf-8")
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "c_extension": train_mod._fastbpe is not None,
        "train": [bench_train("tinyshakespeare", small, 8192, naive)],
    }
    if not args.quick and gutenberg.exists():
        result["memory"] = bench_rss(gutenberg, 8192)  # first, while this process is small
        big = gutenberg.read_text(encoding="utf-8")
        result["train"].append(bench_train("gutenberg_pd14", big, 8192, min(naive, 5)))
        result["train"].append(bench_train("gutenberg_pd14", big, 32768, 0))
        result["encode"] = bench_encode(args.data, big, "gutenberg_pd14")
        result["encode_batch"] = bench_batch(big, "gutenberg_pd14")
    else:
        result["encode"] = bench_encode(args.data, small, "tinyshakespeare")
        result["encode_batch"] = bench_batch(small, "tinyshakespeare")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
