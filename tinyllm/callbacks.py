"""Training callbacks: throughput/MFU, metrics.json, text samples, atomic checkpoint writes.

(The progress bar and the profiler, which reach into Lightning's internals, are in perf.py.)

Each callback does its work on rank zero only (files, printing) and stays off the hot path:
throughput is measured with wall-clock time over windows of steps, without device syncs.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from tinyllm.checkpoint import add_checksum, load_trusted_types_only
from tinyllm.io import torch_save_atomic, write_json_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary name and rename: a crash never leaves half a file.
    Each file carries a checksum of its tensors; loading (resume) uses the safe unpickler
    only and verifies it (tinyllm/checkpoint.py)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        torch_save_atomic(add_checksum(checkpoint), path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Any = None) -> Any:
        return load_trusted_types_only(path, map_location or "cpu")


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_s, train/tokens, train/mfu, train/grad_norm and train/lr, every
    `every` steps (trainer.log_every_n_steps).

    Time spent in validation is excluded, so tokens/s is the training speed alone.
    """

    def __init__(self, every: int = 10, peak_flops: float | None = None) -> None:
        self.every = max(1, every)
        self.peak_flops = peak_flops
        self.train_time = 0.0  # seconds spent in training steps (validation excluded)
        self._t0: float | None = None
        self._tokens0 = 0
        self._last_step = -1
        self.last_tokens_per_s: float | None = None
        self.window_tokens_per_s: list[float] = []  # one figure per logging window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._tokens0 = pl_module.tokens_seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every != 0 or self._t0 is None or step == self._last_step:
            return  # (with gradient accumulation, several micro-batches share one step)
        self._last_step = step
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # once per window, not per step
        dt = time.perf_counter() - self._t0
        tokens = pl_module.tokens_seen - self._tokens0
        self.train_time += dt
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen
        if dt <= 0 or tokens <= 0:
            return
        tps = tokens / dt
        self.last_tokens_per_s = tps
        self.window_tokens_per_s.append(tps)
        metrics = {"train/tokens_per_s": tps, "train/tokens": float(pl_module.tokens_seen)}
        if self.peak_flops:
            flops = pl_module.flops_per_token * tps  # (counted before any FSDP sharding)
            metrics["train/mfu"] = flops / (self.peak_flops * trainer.world_size)
        pl_module.log_step_metrics(metrics)

    def on_validation_start(self, trainer, pl_module) -> None:
        # Close the current window so validation time does not count as training time.
        if self._t0 is not None:
            self.train_time += time.perf_counter() - self._t0
            self._t0 = None  # (the cut window adds no figure to window_tokens_per_s)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning writes logs when the step about to finish is a multiple of `every`:
        # measure that step's gradients (before clipping) and learning rate.
        if (trainer.global_step + 1) % self.every == 0:
            metrics = {"train/lr": float(optimizer.param_groups[0]["lr"])}
            # LitGPT's norm clipping measures the norm anyway (and logs it); else take it here
            from_clip = getattr(pl_module, "grad_norm_from_clipping", None)
            root = getattr(trainer.strategy, "model", None)
            if (from_clip is None or not from_clip()) and hasattr(root, "clip_grad_norm_"):
                # FSDP: this rank holds shards of the gradients; the root module's norm spans
                # every rank's (max_norm=inf: measured, never clipped; every rank calls it)
                metrics["train/grad_norm"] = float(root.clip_grad_norm_(float("inf")))
            elif from_clip is None or not from_clip():
                grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
                if grads:
                    norms = torch._foreach_norm(grads, 2)  # one multi-tensor pass
                    metrics["train/grad_norm"] = float(torch.linalg.vector_norm(torch.stack(norms)))
            # (the step is not counted yet: its 0-based index is global_step)
            pl_module.log_step_metrics(metrics, step=trainer.global_step)

    def median_tokens_per_s(self) -> float | None:
        """Median over the logging windows: robust to pauses and bursts of a shared machine."""
        return statistics.median(self.window_tokens_per_s) if self.window_tokens_per_s else None

    def state_dict(self) -> dict[str, Any]:
        return {"train_time": self.train_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_time = float(state_dict.get("train_time", 0.0))


class MetricsFile(L.Callback):
    """Keeps `<run_dir>/metrics.json` up to date: status, final figures and the val history.

    It also records the process (pid, host) and a heartbeat time, rewritten at least every
    HEARTBEAT_S of training: a run killed by -9 cannot mark itself, but `report` (and a
    user) can tell it from a live one (analysis/sweep.py's is_stale: status `stale`).
    """

    HEARTBEAT_S = 60.0

    def __init__(self, run_dir: str | Path, throughput: ThroughputMonitor, extra: dict) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.throughput = throughput
        self.extra = extra
        self.history: list[dict[str, float]] = []
        self.t_start = time.time()
        self.data: dict[str, Any] = {}
        self.stopper: Any = None  # tinyllm.stopping.LastCheckpoint (its signal, if any)
        self._last_write = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and time.time() - self._last_write >= self.HEARTBEAT_S:
            self.write(trainer, pl_module, "running")  # the heartbeat

    def on_validation_batch_end(self, trainer, pl_module, *args: Any, **kwargs: Any) -> None:
        # (a long validation must not read as a dead run)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def _val_metrics(self, trainer) -> dict[str, float]:
        # LitGPT's exact float64 figures first (what Lightning logs may be rounded)
        exact = getattr(trainer.lightning_module, "val_results", {})
        out = {}
        for k in ("val/loss", "val/bpb", "val/bits_per_token", "val/ppl", "val/exact_match"):
            v = exact.get(k, trainer.callback_metrics.get(k))
            if v is not None:
                out[k] = float(v)
        out.update(  # the figures of eval.tasks / eval.text (tinyllm/eval/callback.py)
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
        )
        return out

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        vals = self._val_metrics(trainer)
        if vals:
            self.history.append(
                {
                    "step": trainer.global_step,
                    "tokens": pl_module.tokens_seen,
                    "time_s": round(time.time() - self.t_start, 3),
                    **vals,
                }
            )
        self.write(trainer, pl_module, "running")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stopper is not None and self.stopper.signum is not None:
            return  # stopped by a signal: train.py writes `interrupted` with the resume command
        self.write(trainer, pl_module, "completed")
        bpb = self.data.get("val/bpb") if self.data else None
        if bpb is not None and trainer.is_global_zero:
            # the metric of TensorBoard's hparams table; written before the loggers close
            for logger in trainer.loggers:
                logger.log_metrics({"hp/val_bpb": bpb}, step=trainer.global_step)

    @rank_zero_only
    def write(self, trainer, pl_module, status: str, error: str | None = None, **more) -> None:
        tps = None
        if self.throughput.train_time > 0:
            tps = pl_module.tokens_seen / self.throughput.train_time
        train_loss = getattr(pl_module, "step_metrics", {}).get("train/loss")
        data = {
            "status": status,
            **{k: None for k in ("val/loss", "val/bpb", "val/ppl")},
            **self._val_metrics(trainer),
            "train/loss": float(train_loss) if train_loss is not None else None,
            "train/tokens_per_s": tps,
            "train/tokens_per_s_median": self.throughput.median_tokens_per_s(),
            "params": pl_module.n_params,  # (counted before any FSDP sharding)
            "step": trainer.global_step,
            "tokens": pl_module.tokens_seen,
            "wall_time_s": round(time.time() - self.t_start, 3),
            "train_time_s": round(self.throughput.train_time, 3),
            "error": error,
            "skipped_steps": getattr(pl_module, "skipped_steps", 0),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat": time.time(),
            "heartbeat_every_s": self.HEARTBEAT_S,
            **more,
            "history": self.history,
            **self.extra,
        }
        for cb in trainer.callbacks:  # sections of other callbacks (e.g. health)
            section = getattr(cb, "metrics_json", None)
            if callable(section):
                data.update(section())
        if status == "completed" and not _finite(data.get("val/loss"), True):
            # a diverged run must not look finished: its val figures are NaN, never ranked
            data["status"] = "degraded"
            data["error"] = error or "the validation loss is not finite (the run diverged)"
        self.data = data
        self._last_write = time.time()
        write_json_atomic(self.path, data)


class TextSampler(L.Callback):
    """Generates a short sample at each validation and logs it to TensorBoard (rank zero).

    With a compiled model the sample is decoded by the eager module: each new length would
    otherwise recompile the training graph. Under FSDP it is skipped (said once): rank zero
    holds only its shards of the weights, and decoding them alone would fail or deadlock.
    """

    def __init__(self, tokenizer, prompt: str = "", max_new_tokens: int = 64, **sampling) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self._said_fsdp = False

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.tokenizer is None or self.max_new_tokens <= 0:
            return
        if not math.isfinite(getattr(pl_module, "val_results", {}).get("val/loss", 0.0)):
            return  # a diverged model's probabilities are NaN: nothing to sample
        from tinyllm.parallel import eager, is_fsdp
        from tinyllm.sampling import generate

        if is_fsdp(trainer):
            if not self._said_fsdp:
                self._said_fsdp = True
                print("tinyllm: text samples are skipped under FSDP (sharded weights); "
                      "generate from a checkpoint instead.", flush=True)  # fmt: skip
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with eager(model), torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. sliding-window notes: a sample is a peek
                text = generate(
                    model,
                    self.tokenizer,
                    self.prompt,
                    max_new_tokens=self.max_new_tokens,
                    seed=0,
                    **self.sampling,
                )
        finally:
            model.train(was_training)
        if isinstance(text, list):
            text = text[0]
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                # Markdown code block: keeps the model's whitespace visible in TensorBoard.
                exp.add_text("samples", "```\n" + text + "\n```", trainer.global_step)


def _finite(v: Any, none_ok: bool = False) -> bool:
    if v is None:
        return none_ok
    return math.isfinite(float(v))
