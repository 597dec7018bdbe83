"""Stopping without losing work: last.ckpt, time-based saves, SIGTERM and Ctrl-C.

Why a callback of our own rather than ModelCheckpoint(save_last=True): Lightning 2.6 writes
last.ckpt only in a step where some other checkpoint was saved, i.e. when val/bpb improved, so
a run whose best validation came early ended with last.ckpt = best.ckpt and its newest weights
nowhere (a resume after a crash silently went back hundreds of steps). `LastCheckpoint` writes
checkpoints/last.ckpt itself, with the newest weights:

- at the end of every validation of the fit, and at the end of training;
- every `every_n_minutes` of training (checkpoint.every_n_minutes): a kill -9, which nothing
  can catch, then loses at most that much time;
- when SIGTERM (what SLURM and most schedulers send before they kill) or SIGINT (Ctrl-C)
  arrives: the current step finishes, last.ckpt is written, and the run stops. train.py then
  marks metrics.json `interrupted`, prints the command that resumes, and exits 128 + the
  signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by
  it. A second Ctrl-C stops at once (the default action of SIGINT: no checkpoint).

Under DDP every rank must take the same decision in the same step (a rank that stops alone
leaves the others waiting in a collective forever): the signal and the "time to save" flags
are combined across ranks with one small all-reduce every `sync_every` steps. One process
checks every step (a Python flag, no device sync).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

_HANDLED = (signal.SIGTERM, signal.SIGINT)


class LastCheckpoint(L.Callback):
    """Keeps `path` (checkpoints/last.ckpt) at the newest weights; stops cleanly on signals.

    After fit, `signal_name` is the name of the signal that stopped the run ("SIGTERM",
    "SIGINT") or None, and `exit_code` the code the process should end with (0 when none).
    """

    def __init__(
        self, path: str | Path, every_n_minutes: float | None = None, sync_every: int = 10
    ) -> None:
        self.path = Path(path)
        self.every_s = float(every_n_minutes) * 60.0 if every_n_minutes else None
        self.sync_every = max(1, int(sync_every))
        self.signum: int | None = None  # the first signal received (this rank or any, synced)
        self.saved_step = -1  # global step of the newest last.ckpt written
        self._last_save = time.monotonic()
        self._step_seen = -1
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ what callers read
    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + int(self.signum)

    # ------------------------------------------------------------------ signal handling
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = time.monotonic()
        # Installed here, after Lightning registers its own SIGTERM handler (after
        # on_fit_start), which raises SIGTERMException, a SystemExit without a code, at the
        # next step: exit code 0, no checkpoint.
        if threading.current_thread() is threading.main_thread():
            for s in _HANDLED:
                self._previous[s] = signal.signal(s, self._on_signal)

    def _restore_handlers(self) -> None:
        for s, handler in self._previous.items():
            if signal.getsignal(s) == self._on_signal:  # (unless Lightning restored its own)
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, whatever is lost
                print("\ntinyllm: second Ctrl-C: stopping at once.", file=sys.stderr, flush=True)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            return  # (a repeated SIGTERM changes nothing)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\ntinyllm: {name} received: finishing the current step, then writing "
            f"{self.path.name} and stopping (Ctrl-C again stops at once, without a checkpoint).",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ when to save
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_seen:
            return  # a micro-batch inside gradient accumulation: the step is not done yet
        self._step_seen = step
        stop, due = self._decide(trainer, pl_module)
        if stop or due:
            self.save(trainer)
        if stop:
            trainer.should_stop = True

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[bool, bool]:
        due = self.every_s is not None and time.monotonic() - self._last_save >= self.every_s
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            if trainer.global_step % self.sync_every:
                return False, False
            flags = torch.tensor([self.signum or 0, int(due)], device=pl_module.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            code, due = int(flags[0]), bool(flags[1])
            if code and self.signum is None:
                self.signum = code  # another rank got the signal: stop with it
        return self.signum is not None, due

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            self.save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_handlers()

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt now (every rank calls this; Lightning writes on rank zero)."""
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step
        self._last_save = time.monotonic()


def resume_command(overrides: list[str], last: str | Path) -> str:
    """The command that continues a run from its last.ckpt: the same overrides, plus ckpt_path."""
    import shlex

    keep = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    args = [*keep, f"ckpt_path={Path(last).resolve()}"]
    return "python -m tinyllm.train " + " ".join(shlex.quote(a) for a in args)
