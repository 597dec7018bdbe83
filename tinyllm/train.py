"""`python -m tinyllm.train [overrides]`: prepare the data if needed, train, write metrics.json.

Read `run()` below, then its steps in order, each a short function of the config and what the
steps before it returned: setup (devices, perf settings, step budget) -> build_data (the
DataModule the `data` group names; tinyllm/data/protocol.py) -> build_module (LitGPT) ->
build_trainer (callbacks, loggers, Trainer) -> fit -> finish (the figures of metrics.json,
written by tinyllm/callbacks.py's MetricsFile). Helpers follow, then the entry point.

One run = one output directory (outputs/<date>/<time>/, sweeps outputs/multirun/...) holding
the Hydra config, TensorBoard events (tb/), checkpoints/ and metrics.json. With
`trainer.devices=N` this process becomes rank 0 and starts ranks 1..N-1 on the same composed
config (see tinyllm/launch.py for why we do not let Lightning re-run sys.argv under Hydra).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.hardware import (  # noqa: F401 (re-exported)
    CPU_AMX_BF16_MIN_WIDTH,
    CPU_BF16_MIN_WIDTH,
    resolve_precision,
)
from tinyllm.launch import (
    clear_launch_env,
    externally_launched,
    is_global_zero,
    launch_workers,
    register_resolvers,
)
from tinyllm.module import selection_metric
from tinyllm.parallel import build_strategy, refuse_skip_with_ranks
from tinyllm.progress import Budget

register_resolvers()  # ${run_stamp:...}: one run directory per job under torchrun/srun


def _when_finetuning(finetune_value: Any, default: Any, *, _root_: DictConfig) -> Any:
    """`${finetuning:A,B}` in conf/train.yaml: A when the run starts from init_from, else B."""
    return finetune_value if _root_.get("init_from") else default


OmegaConf.register_new_resolver("finetuning", _when_finetuning, replace=True)


# --------------------------------------------------------------------------------------------
# The story of one run: setup -> build_data -> build_module -> build_trainer -> fit -> finish.
# Each step reads the config and what the steps before it returned; nothing flows back up.


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train once with a composed config; returns the final metrics (also in metrics.json)."""
    ctx = setup(cfg)
    data = build_data(cfg, ctx)
    lit = build_module(cfg, data, ctx)
    job = build_trainer(cfg, data, lit, ctx)
    fit(cfg, job, lit, data)
    return finish(job, ctx)


@dataclass
class RunContext:
    """Where the run writes, what it runs on, and how long: fixed before any data is read."""

    run_dir: Path
    overrides: list[str]
    accelerator: str
    n_local: int  # processes on this machine
    world: int  # processes in the job
    rank_zero: bool
    allocator: str  # what perf.cpu_allocator did
    max_steps: int  # trainer.max_steps, or what budget.max_tokens works out to
    max_time_s: float | None
    resume_step: int = 0  # the step of ckpt_path (build_module reads it)

    @property
    def budget(self) -> Budget:
        """How the run ends (steps or the clock): the header, progress lines and ETA use it."""
        return Budget(self.max_steps, self.max_time_s)


def setup(cfg: DictConfig) -> RunContext:
    """Check the devices and apply the process-wide perf settings (tinyllm/perf.py)."""
    from tinyllm.perf import FastSetattr, apply_cpu_allocator

    _quiet_lightning_logs()
    hc = HydraConfig.get()
    accel = _accelerator(str(cfg.trainer.accelerator))
    if "fsdp" in str(cfg.trainer.strategy).lower() and (
        accel != "gpu" or not torch.cuda.is_available()
    ):  # (checked first: trainer=fsdp also sets accelerator=gpu, whose error missed the point)
        raise TinyLLMError(
            f"trainer.strategy={cfg.trainer.strategy} (trainer=fsdp) runs on CUDA GPUs only "
            "(Lightning's FSDP strategy shards the model across GPUs), and this machine has "
            "none visible. On CPUs use trainer=ddp or trainer.devices=N (DDP over gloo: every "
            "process holds the whole model)."
        )
    n_local = _check_devices(accel, cfg.trainer.devices)
    world = n_local * int(cfg.trainer.num_nodes)
    refuse_skip_with_ranks(str(cfg.nan_policy), world)  # (before any worker starts)
    FastSetattr.enabled = bool(cfg.perf.fast_setattr)
    max_steps = int(cfg.trainer.max_steps)
    if cfg.budget.max_tokens:
        accum = int(cfg.trainer.accumulate_grad_batches)
        per_step = int(cfg.batch_size) * int(cfg.model.block_size) * accum * world
        max_steps = max(1, math.ceil(float(cfg.budget.max_tokens) / per_step))
    max_time_s = cfg.budget.get("max_time_s")
    global _RANK_ZERO
    _RANK_ZERO = _is_rank_zero()  # (read once: the launch env is cleared at the end of fit)
    if _RANK_ZERO:
        _remove_leftovers(Path(hc.runtime.output_dir), cfg.ckpt_path)
    return RunContext(
        run_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        accelerator=accel,
        n_local=n_local,
        world=world,
        rank_zero=_RANK_ZERO,
        allocator=apply_cpu_allocator(str(cfg.perf.cpu_allocator), accel),
        max_steps=max_steps,
        max_time_s=float(max_time_s) if max_time_s else None,
    )


def build_data(cfg: DictConfig, ctx: RunContext) -> Any:
    """The DataModule the `data` group names with `_target_` (tinyllm/data/protocol.py);
    rank zero prepares a corpus before any worker process starts."""
    from tinyllm.data.protocol import DEFAULT_BUILDER, DataSettings

    settings = DataSettings(
        block_size=int(cfg.model.block_size),
        batch_size=int(cfg.batch_size),
        seed=_seed(cfg, "data_seed"),
        tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True),
        num_workers=int(cfg.loader.num_workers),
        val_windows=_val_windows(cfg.loader.val_windows, int(cfg.model.block_size)),
        data_root=str(cfg.data_root),
        data_dir=cfg.data_dir,
        force_prepare=bool(cfg.force_prepare),
        init_from=cfg.init_from,
        rank_zero=ctx.rank_zero,
    )
    node = OmegaConf.to_container(cfg.data, resolve=True)
    node.setdefault("_target_", DEFAULT_BUILDER)  # (a data group written for the Python API)
    data = _instantiate(node, "data", settings)
    if ctx.rank_zero and hasattr(data, "val_windows"):  # (token bins: say how large)
        _print(_val_size(data.meta, settings.block_size, data.val_windows))
    return data


# Validation scores a fixed set of windows evenly spaced over the val split: the same windows
# for every run of a sweep (at one block_size) and at every validation. Every window of a
# large corpus made validation 530 of a run's 538 s; about a million tokens measure val/bpb
# to ~0.01 and take seconds.
VAL_TOKENS = 1 << 20


def _val_windows(spec: Any, block_size: int) -> int | None:
    """loader.val_windows: auto (about VAL_TOKENS tokens), all/null (every window), or N."""
    if spec is None or str(spec) == "all":
        return None
    if str(spec) == "auto":
        return math.ceil(VAL_TOKENS / block_size)
    try:
        n = int(spec)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise TinyLLMError(
            f"loader.val_windows={spec!r}: use auto (about {VAL_TOKENS:,} tokens), all, or a "
            "positive number of windows."
        )
    return n


def _val_size(meta: dict[str, Any], block_size: int, windows: int | None) -> str:
    total = max(0, (int(meta["splits"]["val"]["tokens"]) - 1) // block_size)
    k = total if windows is None else min(windows, total)
    return (
        f"tinyllm: validation scores {k:,} of the {total:,} windows of the val split "
        f"({k * block_size:,} tokens, evenly spaced, the same at every validation; "
        "loader.val_windows=all for every window)"
    )


def build_module(cfg: DictConfig, data: Any, ctx: RunContext) -> Any:
    """LitGPT from plain values: model config, optimizer settings, the data's meta; then the
    weights of `init_from` (fine-tuning) and compile."""
    from tinyllm.module import LitGPT

    model_cfg = _model_config(cfg, data.tokenizer.vocab_size)
    data.check_compatible(model_cfg)
    optim = dict(
        OmegaConf.to_container(cfg.optim, resolve=True),  # fine-tuning values: conf/train.yaml
        max_steps=ctx.max_steps,
        max_time_s=ctx.max_time_s,
    )
    L.seed_everything(_seed(cfg, "init_seed"), workers=True, verbose=False)
    chat = data.chat_template
    lit = LitGPT(
        model_config=model_cfg,
        tokenizer=data.tokenizer.to_dict(),
        optim=optim,
        data_meta=data.meta,
        chat_template=None if chat is None else chat.to_dict(),
        nan_policy=str(cfg.nan_policy),
    )
    if cfg.ckpt_path:
        ctx.resume_step = _check_resume(Path(cfg.ckpt_path), lit.model.config.to_dict())
    if cfg.init_from:
        _load_weights(lit, cfg.init_from)
    lit.model.activation_checkpointing = bool(cfg.trainer.get("activation_checkpointing"))
    if cfg.compile:
        lit.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`
    return lit


def _load_weights(lit: Any, path: str) -> None:
    from tinyllm.checkpoint import model_from_checkpoint, read_checkpoint

    src = model_from_checkpoint(read_checkpoint(path, option="init_from"), path)
    if src.config.to_dict() != lit.model.config.to_dict():
        raise TinyLLMError(
            f"init_from={path} holds a model with a different config than this "
            "run's `model` (size, parts or vocab differ). Fine-tuning keeps the "
            "architecture: use the same model=/norm=/activation=/pos= as the checkpoint."
        )
    lit.model.load_state_dict(src.state_dict())


@dataclass
class Fit:
    """What fit and finish need: the trainer, metrics.json's writer, our DDP workers."""

    trainer: Any
    metrics: Any
    workers: Any = None
    monitor: str = "val/bpb"


def build_trainer(cfg: DictConfig, data: Any, lit: Any, ctx: RunContext) -> Fit:
    """Lightning's Trainer with tinyllm's callbacks, the configured loggers, the DDP workers."""
    precision = resolve_precision(cfg.trainer.precision, ctx.accelerator, lit.model.config.n_embd)
    _precision_notes(precision, ctx.accelerator)
    monitor = selection_metric(lit.hparams.data_meta)
    _print(_header(lit, ctx, precision, monitor))
    extra = {
        "overrides": ctx.overrides,
        "precision": precision,
        "devices": ctx.world,
        "cpu_allocator": ctx.allocator,
        "config": {
            "model": lit.hparams.model_config,
            "optim": lit.hparams.optim,
            "batch_size": int(cfg.batch_size),
        },
    }
    callbacks, metrics = _callbacks(cfg, ctx, data, monitor, extra)
    if ctx.resume_step:
        _continue_history(metrics, ctx.resume_step)
    loggers = [
        _instantiate(node, ".".join(filter(None, ("logger", name))), save_dir=str(ctx.run_dir))
        for name, node in _targets(cfg.logger)
    ]
    workers = _start_workers(cfg, ctx) if ctx.n_local > 1 and not externally_launched() else None
    trainer = L.Trainer(**_trainer_kwargs(cfg, ctx, precision, callbacks, loggers))
    if loggers and ctx.rank_zero:
        hp = _flat_hparams(cfg, lit.hparams.model_config, lit.n_params)
        loggers[0].log_hyperparams(hp, {"hp/val_bpb": float("nan")})
    return Fit(trainer, metrics, workers, monitor)


def fit(cfg: DictConfig, job: Fit, lit: Any, data: Any) -> None:
    """trainer.fit; a run stopped between validations (a time budget) is scored at its end.
    Any failure marks metrics.json failed and stops our DDP workers."""
    trainer = job.trainer
    stopper = job.metrics.stopper
    try:
        trainer.fit(lit, datamodule=data, ckpt_path=cfg.ckpt_path)
        if stopper.signum is not None:  # SIGTERM/SIGINT: last.ckpt is written; no more work
            _interrupted(trainer, lit, job.metrics)
        elif lit.last_val_step != trainer.global_step and not trainer.interrupted:
            trainer.validate(lit, datamodule=data, verbose=False)
            job.metrics.write(trainer, lit, "completed")
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
        if job.workers is not None:
            job.workers.wait()
    except BaseException as e:
        if job.workers is not None:
            dead = job.workers.dead_worker() if not isinstance(e, KeyboardInterrupt) else None
            job.workers.kill()
            if dead:  # a peer died: its absence is why this process failed (not gloo's words)
                print(f"tinyllm: {dead}", file=sys.stderr, flush=True)
                _write_failed(dead)
                os._exit(1)
        if _RANK_ZERO:
            with contextlib.suppress(OSError):  # (a full disk: the error raised says so)
                job.metrics.write(trainer, lit, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        clear_launch_env()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def finish(job: Fit, ctx: RunContext) -> dict[str, Any]:
    """The final figures (as in metrics.json), and one line saying where they are."""
    final = dict(job.metrics.data)
    if job.metrics.stopper.signum is not None:
        return final  # (with exit_code 143/130 for main)
    if ctx.rank_zero:
        score = final.get(job.monitor)
        _print(
            f"tinyllm: done | step {final.get('step')} | {job.monitor} "
            f"{_r(score)} | val/loss {_r(final.get('val/loss'))} | "
            f"{_r(final.get('train/tokens_per_s'), 0)} tokens/s | "
            f"checkpoint {ctx.run_dir / 'checkpoints' / 'last.ckpt'}"
        )
    return final


def _interrupted(trainer, lit, metrics) -> None:
    """metrics.json says interrupted (with the step); the exact command that resumes."""
    from tinyllm.stopping import resume_command

    stopper = metrics.stopper
    last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    cmd = resume_command(list(HydraConfig.get().overrides.task), last)
    metrics.write(trainer, lit, "interrupted", signal=stopper.signal_name, resume=cmd,
                  exit_code=stopper.exit_code)  # fmt: skip
    _print(
        f"tinyllm: stopped by {stopper.signal_name} after step {trainer.global_step}; "
        f"{last} holds that step. Resume with:\n  {cmd}"
    )


# --------------------------------------------------------------------------------------------
# The parts of build_trainer


def _header(lit: Any, ctx: RunContext, precision: str, monitor: str) -> str:
    mc = lit.hparams.model_config
    return (
        f"tinyllm: {lit.n_params / 1e6:.2f}M parameters | {mc['n_layer']} layers x "
        f"{mc['n_embd']} wide, {mc['norm']}/{mc['activation']}/{mc['pos']} | vocab "
        f"{mc['vocab_size']} | {ctx.accelerator} x{ctx.world} | {precision} | "
        f"{ctx.budget.describe(ctx.resume_step)} | best.ckpt by {monitor} | run dir {ctx.run_dir}"
    )


def _callbacks(cfg: DictConfig, ctx: RunContext, data: Any, monitor: str, extra: dict):
    """tinyllm's own callbacks (each switched by its setting), the data's, then `callbacks`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tinyllm.callbacks import MetricsFile, TextSampler, ThroughputMonitor
    from tinyllm.eval.callback import eval_callbacks
    from tinyllm.progress import BudgetProgressBar, PlainProgress
    from tinyllm.stopping import LastCheckpoint

    ckpt_dir = ctx.run_dir / "checkpoints"
    throughput = ThroughputMonitor(
        every=int(cfg.trainer.log_every_n_steps), peak_flops=_peak_flops(cfg, ctx.accelerator)
    )
    metrics = MetricsFile(ctx.run_dir, throughput, {**extra, "best_checkpoint_metric": monitor})
    # last.ckpt: the newest weights at every validation, at the end, every
    # checkpoint.every_n_minutes and on SIGTERM/SIGINT (tinyllm/stopping.py)
    last = LastCheckpoint(ckpt_dir / "last.ckpt", cfg.checkpoint.get("every_n_minutes"))
    metrics.stopper = last
    cbs = [throughput, metrics, last]
    # best.ckpt by the validation metric
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min",
                           save_top_k=1, save_last=False, enable_version_counter=False)  # fmt: skip
    cbs.append(best)
    if cfg.trainer.get("enable_progress_bar", True):
        # A terminal gets the rich bar; a file or a pipe (CI, nohup, tee) plain lines, since
        # the bar shows nothing there until the end.
        if not sys.stdout.isatty():
            cbs.append(PlainProgress(ctx.budget, every_s=float(cfg.progress_every_s)))
        elif cfg.perf.fast_progress_bar:
            cbs.append(BudgetProgressBar(ctx.budget, refresh_rate=10))  # (else the stock bar)
    if cfg.checkpoint.every_n_steps:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step}",
                                   auto_insert_metric_name=False, save_top_k=-1,
                                   every_n_train_steps=int(cfg.checkpoint.every_n_steps),
                                   enable_version_counter=False))  # fmt: skip
    cbs += data.callbacks()
    s = cfg.sample
    if s.max_new_tokens:
        cbs.append(TextSampler(data.tokenizer, prompt=s.prompt, top_k=s.top_k,
                               max_new_tokens=int(s.max_new_tokens),
                               temperature=float(s.temperature)))  # fmt: skip
    if cfg.get("health") is not None:  # run-health telemetry + spike detector (health.py)
        from tinyllm.health import HealthMonitor

        cbs.append(HealthMonitor(OmegaConf.to_container(cfg.health, resolve=True)))
    cbs += eval_callbacks(cfg.get("eval"), data.tokenizer)  # eval.tasks / eval.text; off: []
    cbs += [_instantiate(node, f"callbacks.{name}") for name, node in _targets(cfg.callbacks)]
    return cbs, metrics


def _precision_notes(precision: str, accel: str) -> None:
    """Warn about bf16-true (no fp32 master weights) and let fp32 matmuls use TF32 on GPUs."""
    from tinyllm.hardware import enable_tf32, precision_warning

    warning = precision_warning(precision)
    if warning and _is_rank_zero():
        print(f"tinyllm: warning: {warning}", file=sys.stderr, flush=True)
    enable_tf32(accel)


def _peak_flops(cfg: DictConfig, accel: str) -> float | None:
    """Peak FLOP/s for MFU: perf.peak_tflops, else the GPU's exact entry in the table."""
    from tinyllm.hardware import peak_tflops

    peak = cfg.perf.peak_tflops
    if peak is None and accel == "gpu":
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name)
        if peak is None:
            _print(
                f"tinyllm: MFU unknown: GPU {name!r} is not in tinyllm/hardware.py's peak "
                "table; set perf.peak_tflops=<dense bf16 TFLOP/s from its data sheet>."
            )
    return float(peak) * 1e12 if peak else None


def _trainer_kwargs(cfg: DictConfig, ctx: RunContext, precision: str, callbacks, loggers):
    from tinyllm.callbacks import AtomicCheckpointIO
    from tinyllm.perf import NoOpProfiler

    strategy = build_strategy(cfg.trainer.strategy, ctx.world)  # DDP/FSDP objects, tuned
    tkw = OmegaConf.to_container(cfg.trainer, resolve=True)
    tkw.pop("activation_checkpointing", None)  # (ours: applied to the model in build_module)
    tkw.update(
        accelerator=ctx.accelerator,
        strategy=strategy,
        precision=precision,
        max_steps=ctx.max_steps,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(ctx.run_dir),
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        # off a terminal PlainProgress stands in (Lightning's bar would print nothing useful)
        enable_progress_bar=bool(cfg.trainer.enable_progress_bar) and sys.stdout.isatty(),
    )
    if tkw.get("profiler") is None and cfg.perf.noop_profiler:
        tkw["profiler"] = NoOpProfiler()  # (+trainer.profiler=simple|advanced|pytorch wins)
    if ctx.max_time_s:  # the budget caps the run (the schedule follows it, see LitGPT)
        tkw["max_time"] = {"seconds": ctx.max_time_s}
    for key in ("limit_val_batches", "max_time", "profiler"):
        if tkw.get(key) is None:
            tkw.pop(key, None)  # (Lightning's own default)
    vci = tkw.get("val_check_interval")
    if isinstance(vci, int) and vci > ctx.max_steps:
        tkw["val_check_interval"] = ctx.max_steps  # always validate at least at the end
    return tkw


def _start_workers(cfg: DictConfig, ctx: RunContext) -> Any:
    """Local ranks 1..n-1 on this job's composed config (tinyllm/launch.py says why)."""
    job_cfg_dir = ctx.run_dir / ".tinyllm"
    job_cfg_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, job_cfg_dir / "ddp_job.yaml")
    args = [
        "--config-dir", str(job_cfg_dir), "--config-name", "ddp_job",
        f"hydra.run.dir={ctx.run_dir}", "hydra.output_subdir=null",
        "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
    ]  # fmt: skip
    workers = launch_workers(ctx.n_local, "tinyllm.train", args, cwd=os.getcwd())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.n_local))

    def on_failure(msg: str) -> None:  # (the other workers are ended by now)
        print(f"tinyllm: {msg}", file=sys.stderr, flush=True)
        _write_failed(msg)
        os._exit(1)

    workers.watch(on_failure)
    return workers


def _targets(node: Any) -> list[tuple[str, dict]]:
    """The `_target_` entries of a config node: itself if it has one, else its children."""
    plain = OmegaConf.to_container(node, resolve=True) if node is not None else None
    if not isinstance(plain, dict):
        return []
    if "_target_" in plain:
        return [("", plain)]
    return [(k, v) for k, v in plain.items() if isinstance(v, dict) and v.get("_target_")]


def _instantiate(node: dict, where: str, *args: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our errors passed through and bad options named."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, TinyLLMError):
            raise cause from None
        raise TinyLLMError(
            f"{where}: could not build {node.get('_target_')} ({cause or e}). Fix the option "
            f"in its conf/ file or the `{where}.<key>=` override."
        ) from None


# --------------------------------------------------------------------------------------------
# Helpers of setup and build_module: logs, devices, precision, seeds, the model config


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
    # Under DDP Lightning recommends sync_dist=True for each epoch-level metric we log with
    # sync_dist=False. Ours are already reduced across ranks before they are logged (val/loss,
    # val/ppl and val/bpb from sums over every rank's windows, val/exact_match from an explicit
    # all-reduce of the hit counts): syncing again would cost a collective and change nothing.
    warnings.filterwarnings(
        "ignore", message=r".*self\.log\('val/(loss|ppl|bpb|exact_match)', \.\.\., sync_dist=True\)"
    )


_RANK_ZERO: bool | None = None  # this process's rank-zero-ness, as found when setup ran


def _remove_leftovers(run_dir: Path, ckpt_path: Any) -> None:
    """Temporaries of checkpoint/metrics writes killed by -9 (their writer is gone)."""
    from tinyllm.io import remove_stale_temporaries

    folders = {run_dir, run_dir / "checkpoints"}
    if ckpt_path:
        folders.add(Path(str(ckpt_path)).parent)
    for folder in folders:
        for p in remove_stale_temporaries(folder):
            _print(f"tinyllm: removed {p}, left by a write that was killed")


def _is_rank_zero() -> bool:
    return is_global_zero()  # (RANK / SLURM_PROCID, not only LOCAL_RANK: multi-node jobs)


def _print(*args: Any) -> None:
    if _is_rank_zero():
        print(*args, flush=True)


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


def _check_resume(path: Path, model_cfg: dict[str, Any]) -> int:
    """A resumed run must rebuild exactly the model of its checkpoint: say so before training.
    Returns the checkpoint's step."""
    from tinyllm.checkpoint import read_checkpoint
    from tinyllm.model import ModelConfig

    ckpt = read_checkpoint(path, option="ckpt_path")
    saved = ModelConfig.from_dict(ckpt["hyper_parameters"]["model_config"]).to_dict()
    diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {model_cfg.get(k)!r}" for k in diff[:6])
        raise TinyLLMError(
            f"ckpt_path={path} was trained with a different model ({detail}). Resume with the "
            "same model/norm/activation/pos/tokenizer settings as that run (its "
            ".hydra/config.yaml has them), or use init_from= to start a new run from its weights."
        )
    return int(ckpt.get("global_step", 0))


def _continue_history(metrics: Any, resume_step: int) -> None:
    """A run resumed in its own directory keeps one metrics history: the validations up to the
    checkpoint's step, and wall time counted on from where the run stopped."""
    import json

    try:
        old = json.loads(metrics.path.read_text())
    except (OSError, ValueError):
        return  # resumed into a new directory (or nothing was written yet)
    metrics.history[:0] = [h for h in old.get("history", []) if h.get("step", 0) <= resume_step]
    if metrics.history:
        metrics.t_start -= float(metrics.history[-1].get("time_s", 0.0))


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


def _r(v: Any, nd: int = 4) -> Any:
    return None if v is None else round(float(v), nd)


def _flat_hparams(cfg: DictConfig, model_cfg: dict, n_params: int) -> dict[str, Any]:
    """The hparams table in TensorBoard: the swept choices and the run's headline numbers."""
    hp: dict[str, Any] = {f"model/{k}": v for k, v in model_cfg.items() if k != "extra"}
    hp.update({f"optim/{k}": v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items()})
    hp.update(
        data=str(cfg.data.name), seed=int(cfg.seed), batch_size=int(cfg.batch_size),
        params=n_params,
    )  # fmt: skip
    # (TensorBoard's hparams take scalars and strings only: e.g. optim.ns_coefficients)
    hp = {k: str(v) if isinstance(v, list | tuple) else v for k, v in hp.items()}
    return {k: ("none" if v is None else v) for k, v in hp.items()}


# --------------------------------------------------------------------------------------------
# The entry point


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run (or one job of a sweep). A user error is one paragraph and exit code 2; in a
    sweep a failed job is marked failed in its metrics.json and the others go on."""
    from hydra.types import RunMode

    from tinyllm.module import DivergenceError

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    final: dict[str, Any] = {}
    with exit_on_user_error(on_error=_write_failed, exit=not sweep):
        try:
            final = run(cfg)
        except DivergenceError as e:
            raise TinyLLMError(f"the run diverged: {e}") from None
        except Exception as e:
            _write_failed(f"{type(e).__name__}: {e}")
            if not sweep:
                raise
            traceback.print_exc()  # one broken job must not take the sweep down
    if final.get("exit_code"):  # stopped by SIGTERM/SIGINT: 143/130, as a shell reports it
        sys.exit(final["exit_code"])
    score = final.get("val/bpb")  # (what a Hydra optimizing sweeper minimizes)
    if score is None:
        score = final.get("val/bits_per_token")
    return float(score) if score is not None else None


def _write_failed(error: str) -> None:
    """Mark the run failed in metrics.json (keeping what an earlier write recorded).

    Only the process that was rank zero when the run started writes: a DDP worker's launch
    environment is cleared at the end of fit, after which it looked like rank zero too.
    """
    if not (_is_rank_zero() if _RANK_ZERO is None else _RANK_ZERO):
        return
    import json

    from tinyllm.io import write_json_atomic

    try:
        path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        data = {}
    data.update(status="failed", error=error)
    for k in ("val/loss", "val/bpb", "train/tokens_per_s", "params", "step"):
        data.setdefault(k, None)
    try:
        write_json_atomic(path, data)
    except (OSError, TinyLLMError) as e:  # e.g. the full disk that failed the run: say so
        print(f"tinyllm: could not mark {path} failed ({e})", file=sys.stderr)


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(main, "train")
