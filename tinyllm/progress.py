"""What a run prints while it trains: the budget that binds, plain progress lines, a run ETA.

A run may stop at `trainer.max_steps` or when `budget.max_time_s` runs out, whichever comes
first. On a loaded machine the clock binds long before the steps do, so every estimate here is
the smaller of the two: the time the remaining steps take at the measured pace, and the time
left on the clock. The header line, the rich bar's ETA column and the plain lines all use the
same `Budget`, so they never disagree.

On a terminal the rich bar shows progress. With stdout going to a file or a pipe (CI, nohup,
tee) the bar shows nothing until the end, so `PlainProgress` prints one line every
`every_s` seconds (and at each validation) instead:

    step 120/3000 | loss 5.8123 | 13,104 tok/s | elapsed 0:00:07 | ETA 0:02:53 (steps)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

import lightning as L
from rich.progress import ProgressColumn
from rich.text import Text

from tinyllm.perf import StepProgressBar


def hms(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=max(0, int(seconds))))


@dataclass
class Budget:
    """How a run ends: after `max_steps` or after `max_time_s` seconds of fitting."""

    max_steps: int
    max_time_s: float | None = None

    def describe(self, start_step: int = 0) -> str:
        """For the header line: the limits and, when both are set, that the first one wins."""
        steps = f"{self.max_steps - start_step:,} steps"
        if start_step:
            steps += f" (from step {start_step:,} to {self.max_steps:,})"
        if not self.max_time_s:
            return steps
        return (
            f"{steps} or {hms(self.max_time_s)} of fitting, whichever comes first (on a "
            "loaded machine the clock binds; the LR schedule follows it)"
        )

    def eta(self, done_steps: int, left_steps: int, elapsed_s: float) -> tuple[float | None, str]:
        """(seconds left, "steps" | "time budget") from the pace so far; None before any step."""
        by_steps = None if done_steps <= 0 else elapsed_s / done_steps * max(0, left_steps)
        if self.max_time_s:
            by_time = max(0.0, self.max_time_s - elapsed_s)
            if by_steps is None or by_time < by_steps:
                return by_time, "time budget"
        return by_steps, "steps"


class _Clock:
    """Steps and seconds since fitting started (the start step is not 0 when resuming)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.step0 = 0

    def start(self, step: int) -> None:
        self.t0, self.step0 = time.monotonic(), step

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0


class PlainProgress(L.Callback):
    """One plain line every `every_s` seconds of training (and one per validation), for logs.

    Rank zero only. Reads the loss and tokens/s that LitGPT already keeps in `step_metrics`
    (no extra device sync)."""

    def __init__(self, budget: Budget, every_s: float = 30.0, stream: IO[str] | None = None):
        self.budget = budget
        self.every_s = float(every_s)
        self.stream = stream
        self.clock = _Clock()
        self._last_print = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.start(trainer.global_step)
        self._last_print = time.monotonic()
        if trainer.is_global_zero:
            self._print(f"training: {self.budget.describe(trainer.global_step)}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        step = trainer.global_step
        if now - self._last_print < self.every_s and step != self.budget.max_steps:
            return
        self._last_print = now
        if trainer.is_global_zero:
            self._print(self.line(step, getattr(pl_module, "step_metrics", {})))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = ("val/loss", "val/bpb", "val/exact_match")
        values = [f"{k} {float(v):.4f}" for k, v in trainer.callback_metrics.items() if k in shown]
        if values:
            self._print(f"validation at step {trainer.global_step:,}: " + " | ".join(values))

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        elapsed = self.clock.elapsed()
        done, left = step - self.clock.step0, self.budget.max_steps - step
        eta, binding = self.budget.eta(done, left, elapsed)
        parts = [f"step {step:,}/{self.budget.max_steps:,}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "train/tokens_per_s" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_s']):,.0f} tok/s")
        parts += [f"elapsed {hms(elapsed)}", f"ETA {hms(eta)} ({binding})"]
        return " | ".join(parts)

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(text, file=stream, flush=True)


class _RunTimeColumn(ProgressColumn):
    """`elapsed • ETA` of the whole run (the stock column's ETA is for one pass over the data,
    and ignores a time budget)."""

    max_refresh = 0.5

    def __init__(self, bar: BudgetProgressBar, style: Any) -> None:
        self.bar = bar
        self.style = style
        super().__init__()

    def render(self, task: Any) -> Text:
        return Text(self.bar.eta_text(), style=self.style)


class BudgetProgressBar(StepProgressBar):
    """The rich bar (on a terminal), with the run's elapsed time and ETA from `Budget`."""

    def __init__(self, budget: Budget, refresh_rate: int = 10, **kw: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kw)
        self.budget = budget
        self.clock = _Clock()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.clock.start(trainer.global_step)

    def eta_text(self) -> str:
        trainer = self._trainer
        if trainer is None or self.clock.t0 is None:
            return f"{hms(None)} • {hms(None)}"
        step, elapsed = trainer.global_step, self.clock.elapsed()
        eta, binding = self.budget.eta(
            step - self.clock.step0, self.budget.max_steps - step, elapsed
        )
        tag = " (time budget)" if binding == "time budget" else ""
        return f"{hms(elapsed)} • ETA {hms(eta)}{tag}"

    def configure_columns(self, trainer: L.Trainer) -> list:
        cols = super().configure_columns(trainer)
        from lightning.pytorch.callbacks.progress.rich_progress import CustomTimeColumn

        return [
            _RunTimeColumn(self, c.style) if isinstance(c, CustomTimeColumn) else c for c in cols
        ]
