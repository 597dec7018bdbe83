"""Decode loop A/B: another checkout's tinyllm/sampling.py against this one, in one process.

Both loops run on the same model (this checkout's GPT; ~1M params, Llama-style, 1 thread),
interleaved (A, B, B, A, ...), timed in process CPU seconds (steadier than wall clock on a
shared machine); the best of `repeats` per side is reported, and the generated tokens must be
identical. For a change to the hot loop of sampling.py:

    python benchmarks/decode_loop.py /path/to/other/checkout [new_tokens] [repeats]
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import tinyllm.sampling as this
from tinyllm.model import GPT, ModelConfig


def load_other(checkout: Path):
    """The other checkout's sampling.py as a module of its own name; it imports only
    tinyllm.errors (and the chat template), which this checkout's package provides."""
    spec = importlib.util.spec_from_file_location(
        "other_sampling", checkout / "tinyllm" / "sampling.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["other_sampling"] = mod  # dataclasses look their module up while decorating
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    other = load_other(Path(sys.argv[1]))
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    torch.set_num_threads(1)
    torch.manual_seed(0)
    llama = dict(norm="rmsnorm", activation="swiglu", pos="rope", bias=False, tie_weights=False)
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=512, **llama)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 512, (1, 8))
    for kw in [dict(temperature=0), dict(temperature=0.8, top_k=50, top_p=0.9)]:
        times: dict[str, list[float]] = {"other": [], "this": []}
        outputs = {}
        sides = [("other", other), ("this", this)]
        for r in range(repeats):
            for name, mod in sides if r % 2 == 0 else sides[::-1]:
                g = torch.Generator().manual_seed(0)
                t0 = time.process_time()
                outputs[name] = mod.generate_ids(model, prompt, n, generator=g, **kw)
                times[name].append(time.process_time() - t0)
        assert outputs["other"] == outputs["this"], "the two loops generated different tokens"
        row = {k: round(n / min(v), 1) for k, v in times.items()}
        ratio = round(row["this"] / row["other"], 3)
        print(json.dumps(dict(settings=kw, new_tokens=n, repeats=repeats, tokens_per_cpu_s=row,
                              this_over_other=ratio, identical_tokens=True)))  # fmt: skip


if __name__ == "__main__":
    main()
