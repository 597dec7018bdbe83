"""Speed measures that reach into Lightning's (or the C library's) internals, in one place.

Each one buys a measured share of a short CPU step (benchmarks/README.md), each depends on
something Lightning does not promise to keep, and each sits behind its own `perf.*` setting
(conf/train.yaml) so it can be switched off when an upgrade breaks it. tests/test_perf.py pins
the internal each relies on: a Lightning upgrade that moves it fails a test instead of
silently losing the speed or changing behaviour.

- FastSetattr (perf.fast_setattr): plain attributes skip nn.Module.__setattr__. Relies on
  Lightning setting `_current_fx_name` on the module before every hook.
- StepProgressBar (perf.fast_progress_bar): the bar's per-step work every refresh_rate steps.
  Relies on RichProgressBar's `_get_train_description`, `total_train_batches`, `_leave`.
- NoOpProfiler (perf.noop_profiler): no context manager per hook. Relies on the trainer
  wrapping every hook in `profiler.profile(name)`.
- tune_cpu_allocator (perf.cpu_allocator): glibc keeps freed step buffers. Relies on glibc's
  mallopt parameter numbers.

The allocator, in more detail. A training step allocates and frees the same activation and
gradient buffers every step.
glibc's malloc serves blocks above its mmap threshold (128 KiB at start, adapting upwards)
with fresh `mmap` pages and returns them to the kernel on `free`, and it trims the top of
its heap once more than its trim threshold is free. Either way the next step's buffers come
back as new pages that the kernel must fault in and zero: on the micro model (nanoGPT's CPU
shape) that is ~2,600 page faults and ~10 MB zeroed per step, 5-10% of the step
(benchmarks/README.md). Fixing the thresholds keeps those blocks in the heap for reuse.

Only glibc on Linux is touched, and only when the user has not chosen an allocator already
(MALLOC_*_ environment variables, or jemalloc/tcmalloc preloaded). The price is that freed
memory (up to the trim threshold) stays with the process instead of going back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.profilers import PassThroughProfiler

# ------------------------------------------------------------------------------ FastSetattr


class FastSetattr:
    """Mixin for a LightningModule: the names in `_plain_attrs` are set as plain attributes.

    nn.Module.__setattr__ checks every assignment against parameters, buffers and submodules;
    Lightning assigns `_current_fx_name` before each of the ~100 hooks of a step, and LitGPT
    updates its counters every step. For names that are never parameters, buffers or modules
    the check is pure cost. `FastSetattr.enabled = False` (perf.fast_setattr=false) restores
    the stock path.
    """

    enabled = True
    _plain_attrs: frozenset[str] = frozenset({"_current_fx_name"})

    def __setattr__(self, name: str, value: Any) -> None:
        if FastSetattr.enabled and name in self._plain_attrs:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


# --------------------------------------------------------------------------- progress bar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, doing its per-step work every `refresh_rate` steps.

    The stock bar updates its task and re-reads every progress-bar metric after each batch
    and only then decides whether to redraw; on a short CPU step that bookkeeping is a
    measurable share of the step (benchmarks/README.md). Here the skipped batches cost one
    comparison; the bar still ends on the epoch's last batch.
    """

    _epoch_batches: int | float = float("inf")
    # train/* figures shown from LitGPT.step_metrics (written without self.log)
    SHOWN = {"train/loss": "train/loss", "train/tokens_per_s": "tok/s"}

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        step_metrics = getattr(pl_module, "step_metrics", {})
        for key, label in self.SHOWN.items():
            if key in step_metrics:
                items[label] = round(step_metrics[key], 3 if key == "train/loss" else 0)
        return items

    def __init__(self, refresh_rate: int = 10, leave: bool = False, **kw: Any) -> None:
        # leave=False: an "epoch" is only a pass over the data in a step-based run, and the
        # stock bar with leave=True stops and restarts its live display at each one (joining
        # its refresh thread: 30-90 ms measured per epoch, inside the training time).
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kw)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_batches = self.total_train_batches  # (min of the epoch and steps left)

    def _get_train_description(self, current_epoch: int) -> str:
        # The stock text reads "Epoch 3/-2" when max_epochs is unbounded (step-based runs).
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        return f"{text:{len(self.validation_description)}}"  # (pad: no flicker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = batch_idx + 1
        if n % max(1, self.refresh_rate) and n != self._epoch_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


# ------------------------------------------------------------------------------- profiler

_NULL_CONTEXT = contextlib.nullcontext()


class NoOpProfiler(PassThroughProfiler):
    """Lightning's default "no profiler", minus its cost: the stock one still enters a
    generator-based context manager around each of the ~100 hook calls of a training step
    (~0.13 ms a step measured here). Used unless `+trainer.profiler=...` is given."""

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return _NULL_CONTEXT


# ------------------------------------------------------------------------------ allocator

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (HEAP_MAX / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024

_state: dict[str, str] = {}


def allocator_status() -> str:
    """What tune_cpu_allocator did in this process ('not called' before it ran)."""
    return _state.get("status", "not called")


def tune_cpu_allocator(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Keep freed large blocks in glibc's heap for reuse; True when the settings took effect.

    Idempotent. Does nothing (and says why in allocator_status()) off Linux/glibc, or when
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ are set, or when LD_PRELOAD
    names another allocator (jemalloc, tcmalloc, mimalloc).
    """
    if _state.get("tuned"):
        return True
    reason = _skip_reason()
    if reason:
        _state["status"] = f"default ({reason})"
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc without libc.so.6
        _state["status"] = f"default (no mallopt: {e})"
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _state["status"] = (
        f"tuned (glibc mmap threshold {mmap_threshold >> 20} MiB, trim threshold "
        f"{trim_threshold >> 20} MiB)"
        if ok
        else "default (mallopt refused the values)"
    )
    if ok:
        _state["tuned"] = "yes"
    return ok


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not Linux: {sys.platform}"
    libc, _ = platform.libc_ver()
    if libc != "glibc":
        return f"C library is {libc or 'unknown'}, not glibc"
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if var in os.environ:
            return f"{var} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} is preloaded"
    return None


def apply_cpu_allocator(choice: str, accelerator: str) -> str:
    """perf.cpu_allocator on CPU runs: 'tuned' or 'default'; returns what was done."""
    from tinyllm.errors import TinyLLMError

    if choice not in ("tuned", "default"):
        raise TinyLLMError(
            f"perf.cpu_allocator={choice!r}: use 'tuned' (glibc keeps freed step buffers for "
            "reuse; faster CPU training) or 'default' (the C library's own settings)."
        )
    if accelerator != "cpu" or choice == "default":
        return "default"
    tune_cpu_allocator()
    return allocator_status()
