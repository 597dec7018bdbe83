"""GPU smoke test: the GPU-only paths of tinyllm, run once, summarised as one JSON object.

Under 10 minutes on one large GPU (model=gpt2, 124M parameters at vocab 50k; here with the
pydocs tokenizer's 4k vocabulary):

  env          torch/CUDA versions, device name, bf16 with and without emulation, the peak
               FLOP/s tinyllm's table gives the device ("unknown" if it is not listed)
  prepare      the pydocs corpus (ships with Python)
  bf16_mixed   model=gpt2, 100 steps: tokens/s, MFU, val/bpb (python -m tinyllm.train)
  compile      the same with compile=true: torch._dynamo's graph, graph-break and recompile
               counters from inside the run
  bf16_true    a bf16-true run whose reported val/loss is recomputed here, exactly (fp64 sums
               over the same windows with the same bf16 weights)
  generate     the bf16-mixed checkpoint in bf16, greedy, with and without the KV cache:
               tokens/s of each and whether they chose the same tokens
  flash        per position type, with and without GQA: does SDPA's flash kernel run?
  fsdp         trainer=fsdp with trainer.activation_checkpointing=true, 20 steps (the text
               sampler skips itself under FSDP); `params` must be the whole model's

    python benchmarks/gpu_smoke.py [--out smoke.json]     # on a GPU machine
    python benchmarks/gpu_smoke.py --dry                  # on CPU: a nano model, few steps

`--dry` runs every section that can run on a CPU with a tiny model (float32 for the mixed
run, bf16-true as is), and marks the GPU-only ones skipped: a check of the script itself,
not of a GPU. Each section records its own error instead of ending the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

_COMPILE_PROBE = """
import json, runpy, sys
import torch._dynamo.utils as du
out = sys.argv.pop(1)
try:
    runpy.run_module("tinyllm.train", run_name="__main__")
except SystemExit as e:
    if e.code not in (None, 0):
        raise
finally:
    c = du.counters
    json.dump({
        "unique_graphs": int(c["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(c["graph_break"].values())),
        "graph_break_reasons": dict(list(c["graph_break"].items())[:10]),
        "recompiles": int(sum(c["recompiles"].values())) if "recompiles" in c else None,
        "frames_ok": int(c["frames"].get("ok", 0)),
    }, open(out, "w"))
"""


def section(summary: dict[str, Any], name: str):
    """Decorator: run the function, store its result (or its error) under summary[name]."""

    def wrap(fn):
        t0 = time.perf_counter()
        try:
            result = fn()
            summary[name] = {"ok": True, **(result or {})}
        except Exception as e:  # a smoke test reports every failure, then goes on
            summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc(file=sys.stderr)
        summary[name]["seconds"] = round(time.perf_counter() - t0, 1)
        return fn

    return wrap


def skipped(summary: dict[str, Any], name: str, why: str) -> None:
    summary[name] = {"ok": None, "skipped": why}


def train(args: list[str], run_dir: Path, timeout: int, probe: Path | None = None) -> dict:
    """`python -m tinyllm.train ARGS` into run_dir; returns its metrics.json."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    full = [*args, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    if probe is None:
        cmd = [sys.executable, "-m", "tinyllm.train", *full]
    else:
        cmd = [sys.executable, "-c", _COMPILE_PROBE, str(probe), *full]
    r = subprocess.run(cmd, cwd=run_dir.parent, env=env, timeout=timeout, text=True,
                       capture_output=True)  # fmt: skip
    metrics_path = run_dir / "metrics.json"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout)[-1500:]
        raise RuntimeError(f"train exited with {r.returncode}: {tail}")
    return json.loads(metrics_path.read_text())


def mfu(model_cfg: dict, tokens_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation from the run's own tokens/s and the model's FLOPs per token."""
    if not tokens_per_s or not peak:
        return None
    import torch

    from tinyllm.model import GPT, ModelConfig

    with torch.device("meta"):
        flops = GPT(ModelConfig.from_dict(model_cfg)).flops_per_token()
    return flops * tokens_per_s / (peak * 1e12)


def run_figures(m: dict, peak: float | None) -> dict[str, Any]:
    tps = m.get("train/tokens_per_s")
    return {
        "status": m.get("status"),
        "steps": m.get("step"),
        "params": m.get("params"),
        "precision": m.get("precision"),
        "tokens_per_s": tps,
        "mfu": mfu(m["config"]["model"], tps, peak),
        "val_loss": m.get("val/loss"),
        "val_bpb": m.get("val/bpb"),
    }


def exact_val_loss(ckpt: Path, data_dir: Path, block_size: int, val_windows: int | None):
    """The mean validation NLL of the checkpoint's weights, summed in fp64 (no metric states)."""
    import torch
    import torch.nn.functional as F

    from tinyllm import load_checkpoint
    from tinyllm.data.datamodule import TokenBinDataModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(str(ckpt), device=device)
    model = model.to(torch.bfloat16)  # the weights bf16-true trained (and validated) with
    dm = TokenBinDataModule(data_dir, block_size=block_size, batch_size=8, val_windows=val_windows)
    ds = dm.val_dataset()
    nll, count = torch.zeros((), dtype=torch.float64), 0
    with torch.inference_mode():
        for i in range(len(ds)):
            x, y = (t.to(device) for t in ds[i])
            logits = model(x)  # (B, T, V) in bf16, as in the run
            B, T, V = logits.shape
            nll += (
                F.cross_entropy(logits.reshape(B * T, V).float(), y.reshape(B * T), reduction="sum")
                .double()
                .cpu()
            )
            count += y.numel()
    return float(nll / count)


def generation(ckpt: Path, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding in bf16 with and without the KV cache: speed and agreement."""
    import torch

    from tinyllm import load_checkpoint
    from tinyllm.sampling import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_checkpoint(str(ckpt), device=device)
    model = model.to(torch.bfloat16)
    out: dict[str, Any] = {}
    texts = {}
    for use_cache in (True, False):
        generate(model, tok, "def ", max_new_tokens=4, top_k=1, use_cache=use_cache)  # warm up
        if device == "cuda":
            torch.cuda.synchronize()
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        texts[use_cache] = generate(
            model, tok, "def ", max_new_tokens=new_tokens, top_k=1, stop_at_eos=False,
            use_cache=use_cache, stats=stats,
        )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        key = "kv_cache" if use_cache else "no_cache"
        out[f"{key}_tokens_per_s"] = stats.get("new_tokens", new_tokens) / dt
    out["same_text"] = texts[True] == texts[False]
    return out


def flash_eligibility() -> dict[str, Any]:
    """Per position type x (MHA, GQA): does SDPA run with only the flash kernel allowed?"""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinyllm.model import GPT, ModelConfig

    calls = {"n": 0}
    real = F.scaled_dot_product_attention

    def counting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return real(*a, **k)

    table: dict[str, Any] = {}
    F.scaled_dot_product_attention = counting
    try:
        for pos in ("learned", "sinusoidal", "rope", "alibi", "none"):
            for kv in (8, 2):
                cfg = ModelConfig.from_dict(dict(
                    vocab_size=512, block_size=256, n_layer=1, n_head=8, n_kv_head=kv,
                    n_embd=512, pos=pos))  # fmt: skip
                model = GPT(cfg).cuda().to(torch.bfloat16)
                x = torch.randint(0, 512, (2, 256), device="cuda")
                calls["n"] = 0
                name = f"{pos}/{'gqa' if kv < 8 else 'mha'}"
                try:
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
                        model(x)
                    table[name] = True if calls["n"] else "no SDPA call (manual attention)"
                except RuntimeError as e:
                    table[name] = f"no: {str(e).splitlines()[0][:160]}"
    finally:
        F.scaled_dot_product_attention = real
    return {"eligible": table}


def checks(summary: dict[str, Any]) -> dict[str, bool | None]:
    """Pass/fail of what the sections measured (None: the section did not run)."""
    comp = summary.get("compile", {}).get("dynamo")
    return {
        "bf16_true_val_loss_exact": summary.get("bf16_true", {}).get("val_loss_matches"),
        "compile_no_graph_breaks": None if comp is None else comp["graph_breaks"] == 0,
        "generate_kv_cache_agrees": summary.get("generate", {}).get("same_text"),
        "fsdp_completed": None
        if "status" not in summary.get("fsdp", {})
        else summary["fsdp"]["status"] == "completed",
        "fsdp_params_whole_model": summary.get("fsdp", {}).get("params_whole_model"),
    }


def env_section(peak_holder: dict) -> dict[str, Any]:
    import torch

    from tinyllm.hardware import gpu_has_bf16, peak_tflops

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name)
        peak_holder["peak"] = peak
        out.update(
            device=name,
            bf16_native=gpu_has_bf16(),
            bf16_with_emulation=bool(torch.cuda.is_bf16_supported()),
            peak_tflops=peak if peak is not None else "unknown",
            capability=list(torch.cuda.get_device_capability(0)),
        )
    else:
        out.update(device="cpu", peak_tflops="unknown")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU check of the script: tiny model")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not a.dry
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tinyllm-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data" / "pydocs"
    summary: dict[str, Any] = {"dry": a.dry, "workdir": str(work)}
    holder: dict[str, Any] = {"peak": None}
    t_all = time.perf_counter()

    section(summary, "env")(lambda: env_section(holder))
    model = ["model=gpt2"] if gpu else ["model=nano", "tokenizer.vocab_size=512"]
    steps, fsdp_steps = (100, 20) if gpu else (6, 4)
    batch = "batch_size=12" if gpu else "batch_size=4"
    val = "loader.val_windows=64" if gpu else "loader.val_windows=8"
    common = [*model, batch, val, f"data_dir={data_dir}", "logger=none", "sample.max_new_tokens=0",
              f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
              "trainer.log_every_n_steps=10" if gpu else "trainer.log_every_n_steps=2",
              "optim.warmup_steps=10"]  # fmt: skip
    if not gpu:
        common.append("trainer.accelerator=cpu")
    vocab = [m for m in model if m.startswith("tokenizer.")] or ["tokenizer.vocab_size=4096"]

    @section(summary, "prepare")
    def _prepare():
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run(
            [sys.executable, "-m", "tinyllm.prepare", "data=pydocs", *vocab, f"out_dir={data_dir}"],
            check=True, env=env, cwd=work, capture_output=True, timeout=600,
        )  # fmt: skip
        return {"data_dir": str(data_dir)}

    mixed = "trainer.precision=bf16-mixed" if gpu else "trainer.precision=32-true"

    @section(summary, "bf16_mixed" if gpu else "fp32_dry")
    def _mixed():
        return run_figures(train([*common, mixed], work / "mixed", 900), holder["peak"])

    @section(summary, "compile")
    def _compile():
        probe = work / "dynamo_counters.json"
        m = train([*common, mixed, "compile=true", "sample.max_new_tokens=16"], work / "compiled",
                  1200, probe=probe)  # fmt: skip
        return {**run_figures(m, holder["peak"]), "dynamo": json.loads(probe.read_text())}

    @section(summary, "bf16_true")
    def _bf16_true():
        m = train([*common, "trainer.precision=bf16-true"], work / "bf16_true", 900)
        block = int(m["config"]["model"]["block_size"])
        exact = exact_val_loss(
            work / "bf16_true" / "checkpoints" / "last.ckpt", data_dir, block,
            int(val.split("=")[1]),
        )  # fmt: skip
        reported = m.get("val/loss")
        rel = abs(reported - exact) / exact if reported is not None else None
        matches = rel is not None and rel < 1e-3
        figures = {"val_loss_exact": exact, "val_loss_rel_error": rel, "val_loss_matches": matches}
        return {**run_figures(m, holder["peak"]), **figures}

    @section(summary, "generate")
    def _generate():
        return generation(work / "mixed" / "checkpoints" / "last.ckpt", 256 if gpu else 16)

    if gpu:
        section(summary, "flash")(flash_eligibility)

        @section(summary, "fsdp")
        def _fsdp():
            args = [*common, "trainer=fsdp", "trainer.devices=1",
                    "trainer.activation_checkpointing=true", "sample.max_new_tokens=16",
                    f"trainer.max_steps={fsdp_steps}", f"trainer.val_check_interval={fsdp_steps}",
                    ]  # fmt: skip
            m = run_figures(train(args, work / "fsdp", 900), holder["peak"])
            return {**m, "params_whole_model": m["params"] == summary["bf16_mixed"].get("params")}
    else:
        skipped(summary, "flash", "no CUDA device (dry run)")
        skipped(summary, "fsdp", "no CUDA device (dry run): Lightning's FSDP needs GPUs")

    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    summary["checks"] = checks(summary)
    ran = all(v.get("ok") is not False for v in summary.values() if isinstance(v, dict))
    summary["ok"] = ran and all(v is not False for v in summary["checks"].values())
    text = json.dumps(summary, indent=2, default=lambda o: None if o != o else str(o))
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
