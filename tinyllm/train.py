"""`python -m tinyllm.train [overrides]`: prepare the data if needed, train, write metrics.json.

One run = one output directory (outputs/<date>/<time>/, sweeps outputs/multirun/...) holding
the Hydra config, TensorBoard events (tb/), checkpoints/ and metrics.json. With
`trainer.devices=N` this process becomes rank 0 and starts ranks 1..N-1 on the same composed
config (see tinyllm/launch.py for why we do not let Lightning re-run sys.argv under Hydra).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tinyllm.errors import TinyLLMError

# Peak dense bf16 FLOP/s of common GPUs, for MFU (override with perf.peak_tflops).
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}

# On CPUs with bf16 matrix units, bf16 autocast wins once the matrices are large enough for
# the matmul speed-up to outweigh the casts; below this width fp32 is faster. Measured with
# benchmarks/precision.py on the development machine (see benchmarks/README.md).
CPU_BF16_MIN_WIDTH = 512


class _DropNoise(logging.Filter):
    """Lightning's advertising tip and a deprecation note from its own internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "litlogger" not in msg and "LeafSpec" not in msg


def _quiet_lightning_logs() -> None:
    """Let Lightning's messages reach Hydra's handlers once (console + run log), not twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    for h in logging.getLogger().handlers:  # Hydra's console and file handlers
        # (a logger's own filter misses records of its children; a handler's sees them all)
        h.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Our train sampler derives its position from the restored global step, so a mid-epoch
    # resume continues the same stream; Lightning cannot know that and warns.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _print(*args: Any) -> None:
    if _is_rank_zero():
        print(*args, flush=True)


def resolve_precision(precision: Any, accelerator: str, n_embd: int) -> str:
    """`auto` -> the fastest precision for this device and model width (documented rule)."""
    if str(precision) != "auto":
        return str(precision)
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if n_embd >= CPU_BF16_MIN_WIDTH and _cpu_has_bf16() else "32-true"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def _accelerator(cfg_accel: str) -> str:
    if cfg_accel == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg_accel


def _check_devices(accel: str, devices: Any) -> int:
    """Number of local processes, with a clear error when more are asked than exist."""
    if accel == "gpu" and torch.cuda.device_count() == 0:
        raise TinyLLMError(
            "trainer.accelerator=gpu but no CUDA GPU is visible to this process (a CPU-only "
            "torch build, no driver, or CUDA_VISIBLE_DEVICES hides them). Use "
            "trainer.accelerator=auto (or cpu), or install the torch build for your CUDA."
        )
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() if accel == "gpu" else 1
    if isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices):
        n = len(devices) if not isinstance(devices, str) else len(devices.strip(",").split(","))
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            raise TinyLLMError(
                f"trainer.devices={devices!r} is not a number, a list or 'auto'."
            ) from None
    available = torch.cuda.device_count() if accel == "gpu" else (os.cpu_count() or 1)
    if n < 1 or n > available:
        kind = "GPUs" if accel == "gpu" else "CPU cores"
        raise TinyLLMError(
            f"trainer.devices={n} but this machine has {available} {kind}. Use "
            f"trainer.devices=<1..{available}> (or trainer.num_nodes for several machines)."
        )
    return n


def _seed(cfg: DictConfig, key: str) -> int:
    v = cfg.get(key)
    return int(cfg.seed if v is None else v)


def build_data(cfg: DictConfig, block_size: int, rank_zero: bool):
    """Prepare (rank zero, once) and open the data; returns (datamodule, tokenizer, meta)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    tok_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    if data_cfg.get("source") == "qa":
        return _build_qa_data(cfg, data_cfg, block_size)
    from tinyllm.data.datamodule import TokenBinDataModule
    from tinyllm.data.prepare import default_data_dir, prepare_data, read_meta

    if cfg.data_dir:  # an already prepared folder: used as it is, never written to
        out = Path(cfg.data_dir)
    else:
        out = default_data_dir(data_cfg, tok_cfg, cfg.data_root)
        if rank_zero:
            # Our own workers start after this, so the bins exist before any of them opens them.
            out = prepare_data(data_cfg, tok_cfg, out, force=bool(cfg.force_prepare))
        else:
            # Under SLURM/torchrun every rank starts at once: wait for rank zero's prepare.
            _wait_for(out / "meta.json")
    dm = TokenBinDataModule(
        out,
        block_size=block_size,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.loader.num_workers),
        seed=_seed(cfg, "data_seed"),
        val_windows=cfg.loader.val_windows,
    )
    return dm, dm.tokenizer, read_meta(out)


def _check_resume(path: Path, model_cfg: dict[str, Any]) -> None:
    """A resumed run must rebuild exactly the model of its checkpoint: say so before training."""
    from tinyllm.checkpoint import read_checkpoint
    from tinyllm.model import ModelConfig

    saved = read_checkpoint(path)["hyper_parameters"]["model_config"]
    saved = ModelConfig.from_dict(saved).to_dict()  # defaults filled in, as model_cfg is
    diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {model_cfg.get(k)!r}" for k in diff[:6])
        raise TinyLLMError(
            f"ckpt_path={path} was trained with a different model ({detail}). Resume with the "
            "same model/norm/activation/pos/tokenizer settings as that run (its "
            ".hydra/config.yaml has them), or use init_from= to start a new run from its weights."
        )


def _wait_for(path: Path, timeout_s: float = 6 * 3600) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TinyLLMError(
                f"Waited {timeout_s:.0f} s for rank zero to prepare {path.parent}. Prepare the "
                "data once beforehand (`python -m tinyllm.prepare ...`) and pass data_dir=."
            )
        time.sleep(2.0)


def _build_qa_data(cfg: DictConfig, data_cfg: dict, block_size: int):
    from tinyllm.data.qa import QADataModule

    tokenizer = None
    if cfg.init_from:
        from tinyllm.checkpoint import read_checkpoint, tokenizer_from_checkpoint

        tokenizer = tokenizer_from_checkpoint(read_checkpoint(cfg.init_from), cfg.init_from)
    elif cfg.tokenizer.path:
        from tinyllm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer.path)
    dm = QADataModule.from_config(
        data_cfg,
        tokenizer=tokenizer,
        tokenizer_cfg=OmegaConf.to_container(cfg.tokenizer, resolve=True),
        block_size=block_size,
        batch_size=int(cfg.batch_size),
        seed=_seed(cfg, "data_seed"),
    )
    return dm, dm.tokenizer, dm.meta


def _model_config(cfg: DictConfig, vocab_size: int) -> dict[str, Any]:
    from tinyllm.model import ModelConfig

    mc = OmegaConf.to_container(cfg.model, resolve=True)
    if mc.get("vocab_size") is None:
        mc["vocab_size"] = vocab_size
    elif int(mc["vocab_size"]) < vocab_size:
        raise TinyLLMError(
            f"model.vocab_size={mc['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({vocab_size}). Remove the override (null uses the tokenizer's size) or raise it."
        )
    try:
        ModelConfig.from_dict(mc)  # unknown keys fail here; GPT() checks the values
    except ValueError as e:
        raise TinyLLMError(str(e)) from None
    if cfg.get("match_params"):
        mc["mlp_hidden"] = match_params(mc, int(cfg.match_params))
    return mc


def count_params(model_cfg: dict[str, Any]) -> int:
    """Parameters of the GPT a config describes, without allocating it (meta device)."""
    from tinyllm.model import GPT, ModelConfig

    with torch.device("meta"):
        return GPT(ModelConfig.from_dict(model_cfg)).num_params()


def match_params(model_cfg: dict[str, Any], target: int) -> int:
    """The MLP hidden width that brings the model closest to `target` parameters.

    For fair ablations: swapping a part (a gated MLP, learned positions, no bias) changes the
    parameter count; resizing the MLP, the one width free of other constraints, evens it out.
    Params grow monotonically with the hidden width, so a binary search finds it.
    """
    step = int(model_cfg.get("mlp_multiple_of") or 1)

    def params(units: int) -> int:
        return count_params({**model_cfg, "mlp_hidden": units * step})

    lo, hi = 1, max(2, 16 * int(model_cfg["n_embd"]) // step)
    if params(lo) > target or params(hi) < target:
        raise TinyLLMError(
            f"match_params={target} cannot be reached by resizing the MLP of this model "
            f"({params(lo)} to {params(hi)} parameters). Pick a target in that range or "
            "change the model's size."
        )
    while hi - lo > 1:  # invariant: params(lo) <= target <= params(hi)
        mid = (lo + hi) // 2
        if params(mid) <= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda u: abs(params(u) - target))
    return best * step


def _callbacks(cfg: DictConfig, run_dir: Path, dm, tokenizer, peak_flops, extra: dict):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tinyllm.callbacks import MetricsFile, StepProgressBar, TextSampler, ThroughputMonitor

    ckpt_dir = run_dir / "checkpoints"
    throughput = ThroughputMonitor(every=int(cfg.trainer.log_every_n_steps), peak_flops=peak_flops)
    metrics = MetricsFile(run_dir, throughput, extra)
    cbs = [
        throughput,
        metrics,
        # best.ckpt by val/bpb; last.ckpt always (saved on every validation and at the end)
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor="val/bpb",
            mode="min",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
        ),
    ]
    if cfg.trainer.get("enable_progress_bar", True):  # (false: batch jobs, log files)
        cbs.append(StepProgressBar(refresh_rate=10))
    if cfg.checkpoint.every_n_steps:
        cbs.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step-{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=int(cfg.checkpoint.every_n_steps),
                save_top_k=-1,
                enable_version_counter=False,
            )
        )
    if str(cfg.data.get("source")) == "qa" and getattr(dm, "val_records", None):
        from tinyllm.data.qa import ExactMatchCallback

        cbs.append(ExactMatchCallback(dm.val_records, dm.tokenizer, dm.chat_template))
    if cfg.sample.max_new_tokens and tokenizer is not None:
        s = cfg.sample
        cbs.append(
            TextSampler(
                tokenizer,
                prompt=s.prompt,
                max_new_tokens=int(s.max_new_tokens),
                temperature=float(s.temperature),
                top_k=s.top_k,
            )
        )
    return cbs, metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train once with a composed config; returns the final metrics (also in metrics.json)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from tinyllm.callbacks import AtomicCheckpointIO
    from tinyllm.launch import clear_launch_env, externally_launched, launch_workers
    from tinyllm.module import LitGPT

    _quiet_lightning_logs()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    rank_zero = _is_rank_zero()
    accel = _accelerator(str(cfg.trainer.accelerator))
    n_local = _check_devices(accel, cfg.trainer.devices)
    world = n_local * int(cfg.trainer.num_nodes)
    if "fsdp" in str(cfg.trainer.strategy).lower() and accel != "gpu":
        raise TinyLLMError(
            f"trainer.strategy={cfg.trainer.strategy} runs on GPUs only (Lightning's FSDP "
            f"strategy needs CUDA devices), but this run's accelerator is {accel}. On CPUs use "
            "trainer.devices=N (DDP over gloo: every process holds the whole model)."
        )
    allocator = _cpu_allocator(cfg, accel)

    # --- data and model config (rank zero prepares before any worker starts) -------------
    block_size = int(cfg.model.block_size)
    dm, tokenizer, meta = build_data(cfg, block_size, rank_zero)
    model_cfg = _model_config(cfg, tokenizer.vocab_size)
    if hasattr(dm, "check_compatible"):
        dm.check_compatible(model_cfg["vocab_size"], block_size)

    # --- budget -> steps ------------------------------------------------------------------
    accum = int(cfg.trainer.accumulate_grad_batches)
    max_steps = int(cfg.trainer.max_steps)
    if cfg.budget.max_tokens:
        per_step = int(cfg.batch_size) * block_size * accum * world
        max_steps = max(1, math.ceil(float(cfg.budget.max_tokens) / per_step))
    max_time_s = cfg.budget.get("max_time_s")
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    if cfg.init_from:
        # Fine-tuning: a low LR and short warm-up by default; optim.* given on the command
        # line still wins.
        given = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}
        for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items():
            if f"optim.{k}" not in given:
                optim_cfg[k] = v
    optim = dict(
        optim_cfg,
        max_steps=max_steps,
        max_time_s=float(max_time_s) if max_time_s else None,
    )

    precision = resolve_precision(cfg.trainer.precision, accel, int(model_cfg["n_embd"]))
    peak = cfg.perf.peak_tflops
    if peak is None and accel == "gpu":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)
    peak_flops = float(peak) * 1e12 if peak else None

    # --- module (init seed) ---------------------------------------------------------------
    L.seed_everything(_seed(cfg, "init_seed"), workers=True, verbose=False)
    chat = getattr(dm, "chat_template", None)
    lit = LitGPT(
        model_config=model_cfg,
        tokenizer=tokenizer.to_dict(),
        optim=optim,
        data_meta=meta,
        chat_template=chat.to_dict() if hasattr(chat, "to_dict") else chat,
        nan_policy=str(cfg.nan_policy),
    )
    if cfg.ckpt_path:
        _check_resume(Path(cfg.ckpt_path), lit.model.config.to_dict())
    if cfg.init_from:
        from tinyllm.checkpoint import model_from_checkpoint, read_checkpoint

        src = model_from_checkpoint(read_checkpoint(cfg.init_from), cfg.init_from)
        if src.config.to_dict() != lit.model.config.to_dict():
            raise TinyLLMError(
                f"init_from={cfg.init_from} holds a model with a different config than this "
                "run's `model` (size, parts or vocab differ). Fine-tuning keeps the "
                "architecture: use the same model=/norm=/activation=/pos= as the checkpoint."
            )
        lit.model.load_state_dict(src.state_dict())
    n_params = lit.model.num_params()
    _print(
        f"tinyllm: {n_params / 1e6:.2f}M parameters | {model_cfg['n_layer']} layers x "
        f"{model_cfg['n_embd']} wide, {model_cfg['norm']}/{model_cfg['activation']}/"
        f"{model_cfg['pos']} | vocab {model_cfg['vocab_size']} | {accel} x{world} | "
        f"{precision} | {max_steps} steps | run dir {run_dir}"
    )
    if cfg.compile:
        lit.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`

    extra = {
        "overrides": list(hc.overrides.task),
        "precision": precision,
        "devices": world,
        "cpu_allocator": allocator,
        "config": {"model": model_cfg, "optim": optim, "batch_size": int(cfg.batch_size)},
    }
    callbacks, metrics = _callbacks(cfg, run_dir, dm, tokenizer, peak_flops, extra)
    loggers: list = []
    if cfg.logger.name == "tensorboard":
        loggers.append(
            TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)
        )

    # --- processes ------------------------------------------------------------------------
    workers = None
    strategy = cfg.trainer.strategy
    if world > 1 and strategy == "auto":
        strategy = "ddp"
    if n_local > 1 and not externally_launched():
        job_cfg_dir = run_dir / ".tinyllm"
        job_cfg_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, job_cfg_dir / "ddp_job.yaml")
        args = [
            "--config-dir", str(job_cfg_dir), "--config-name", "ddp_job",
            f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
        ]  # fmt: skip
        workers = launch_workers(n_local, "tinyllm.train", args, cwd=os.getcwd())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_local))

        def on_failure(rank: int, rc: int) -> None:
            msg = f"DDP worker rank {rank} exited with code {rc}; stopping the run."
            print(f"tinyllm: {msg}", file=sys.stderr, flush=True)
            _write_failed(msg)
            os._exit(1)

        workers.watch(on_failure)

    tkw = OmegaConf.to_container(cfg.trainer, resolve=True)
    tkw.update(
        accelerator=accel,
        strategy=strategy,
        precision=precision,
        max_steps=max_steps,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    if tkw.get("profiler") is None:  # (+trainer.profiler=simple|advanced|pytorch still works)
        from tinyllm.callbacks import NoOpProfiler

        tkw["profiler"] = NoOpProfiler()
    if tkw.get("limit_val_batches") is None:
        tkw.pop("limit_val_batches")
    if max_time_s:  # the budget caps the run (the schedule follows it, see LitGPT)
        tkw["max_time"] = {"seconds": float(max_time_s)}
    if tkw.get("max_time") is None:
        tkw.pop("max_time")
    vci = tkw.get("val_check_interval")
    if isinstance(vci, int) and vci > max_steps:
        tkw["val_check_interval"] = max_steps  # always validate at least at the end
    trainer = L.Trainer(**tkw)
    if loggers and rank_zero:
        loggers[0].log_hyperparams(
            _flat_hparams(cfg, model_cfg, n_params), {"hp/val_bpb": float("nan")}
        )

    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=cfg.ckpt_path)
        if lit.last_val_step != trainer.global_step and not trainer.interrupted:
            # stopped between validations (a time budget): score the final weights too
            trainer.validate(lit, datamodule=dm, verbose=False)
            metrics.write(trainer, lit, "completed")
            trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        if workers is not None:
            workers.wait()
    except BaseException as e:
        if workers is not None:
            workers.kill()
        if rank_zero:
            metrics.write(trainer, lit, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        clear_launch_env()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    final = dict(metrics.data)
    if rank_zero:
        bpb = final.get("val/bpb")
        tps = final.get("train/tokens_per_s")
        _print(
            f"tinyllm: done | step {final.get('step')} | val/bpb "
            f"{bpb if bpb is None else round(bpb, 4)} | val/loss "
            f"{_r(final.get('val/loss'))} | {_r(tps, 0)} tokens/s | "
            f"checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}"
        )
    return final


def _cpu_allocator(cfg: DictConfig, accel: str) -> str:
    """Apply perf.cpu_allocator on CPU runs (tinyllm/runtime.py); returns what was done."""
    choice = str(cfg.perf.get("cpu_allocator", "tuned"))
    if choice not in ("tuned", "default"):
        raise TinyLLMError(
            f"perf.cpu_allocator={choice!r}: use 'tuned' (glibc keeps freed step buffers for "
            "reuse; faster CPU training) or 'default' (the C library's own settings)."
        )
    if accel != "cpu" or choice == "default":
        return "default"
    from tinyllm.runtime import allocator_status, tune_cpu_allocator

    tune_cpu_allocator()
    return allocator_status()


def _r(v: Any, nd: int = 4) -> Any:
    return None if v is None else round(float(v), nd)


def _flat_hparams(cfg: DictConfig, model_cfg: dict, n_params: int) -> dict[str, Any]:
    """The hparams table in TensorBoard: the swept choices and the run's headline numbers."""
    hp: dict[str, Any] = {f"model/{k}": v for k, v in model_cfg.items() if k != "extra"}
    hp.update({f"optim/{k}": v for k, v in OmegaConf.to_container(cfg.optim).items()})
    hp.update(
        data=str(cfg.data.name), seed=int(cfg.seed), batch_size=int(cfg.batch_size),
        params=n_params,
    )  # fmt: skip
    return {k: ("none" if v is None else v) for k, v in hp.items()}


def _fail(msg: str, multirun: bool) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(2)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        final = run(cfg)
    except TinyLLMError as e:
        _write_failed(str(e))
        _fail(str(e), multirun)
        return None
    except Exception as e:
        from tinyllm.module import DivergenceError

        _write_failed(f"{type(e).__name__}: {e}")
        if isinstance(e, DivergenceError):
            _fail(f"the run diverged: {e}", multirun)
            return None
        if not multirun:
            raise
        # In a sweep, one broken run must not take the others down: it is marked failed.
        traceback.print_exc()
        return None
    bpb = final.get("val/bpb")
    return float(bpb) if bpb is not None else None


def _write_failed(error: str) -> None:
    """Mark the run failed in metrics.json (keeping what an earlier write recorded)."""
    if not _is_rank_zero():
        return
    import json

    from tinyllm.callbacks import write_json_atomic

    try:
        path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        data = {}
    data.update(status="failed", error=error)
    for k in ("val/loss", "val/bpb", "train/tokens_per_s", "params", "step"):
        data.setdefault(k, None)
    write_json_atomic(path, data)


if __name__ == "__main__":
    main()
