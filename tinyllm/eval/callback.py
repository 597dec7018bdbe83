"""Evaluations during training: `eval.tasks=[...]`, `eval.text=...`, `eval.every_n_steps=N`.

The evaluations ride on validation passes (at the first validation on or after every N steps;
every validation when N is null), so their figures land in the same metrics.json history rows
as val/bpb and beside it in TensorBoard:

    eval/<task>/acc, eval/<task>/acc_norm      for each task file (its name without .jsonl)
    eval/<name>/bpb                            for eval.text (name: the file's or folder's)

Under DDP each rank scores every world-th item (and every world-th text window) and the sums
are added across ranks: counts of correct answers are integers and the log-likelihoods are
summed in float64, so the figures equal a single process's. FSDP is refused: a sharded model
cannot run forward passes on one rank alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tinyllm.errors import TinyLLMError
from tinyllm.eval.multiple_choice import score_items
from tinyllm.eval.scoring import Scorer
from tinyllm.eval.tasks import Task, load_task
from tinyllm.eval.text import _check_head, score_file, text_files


def eval_callbacks(cfg: Any, tokenizer: Any) -> list[L.Callback]:
    """[EvalCallback] when `eval.tasks` or `eval.text` is set, else [] (the default)."""
    if cfg is None or not (cfg.get("tasks") or cfg.get("text")):
        return []
    every = cfg.get("every_n_steps")
    if every is not None and (isinstance(every, bool) or int(every) < 1):
        raise TinyLLMError(f"eval.every_n_steps={every} must be a positive integer or null.")
    return [
        EvalCallback(
            tokenizer,
            tasks=[str(t) for t in (cfg.get("tasks") or [])],
            text=cfg.get("text"),
            every_n_steps=int(every) if every is not None else None,
            limit=cfg.get("limit"),
            stride=cfg.get("stride"),
            batch_size=int(cfg.get("batch_size") or 16),
        )
    ]


class EvalCallback(L.Callback):
    def __init__(
        self,
        tokenizer: Any,
        tasks: list[str],
        text: str | None = None,
        every_n_steps: int | None = None,
        limit: int | None = None,
        stride: int | None = None,
        batch_size: int = 16,
    ) -> None:
        self.tokenizer, self.every, self.stride, self.batch_size = (
            tokenizer,
            every_n_steps,
            stride,
            batch_size,
        )
        self.tasks: list[Task] = [load_task(t, limit) for t in tasks]  # bad files fail now
        self.text_name = None
        self.files: list[Path] = []
        if text:
            self.files = text_files(str(text))
            for f in self.files:
                if not _check_head(f, "replace"):
                    raise TinyLLMError(f"eval.text file {f} is not valid UTF-8; convert it.")
            p = Path(str(text))
            self.text_name = p.stem if p.is_file() else (p.name if p.is_dir() else "text")
        self.next_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "FSDP" in type(trainer.strategy).__name__:
            raise TinyLLMError(
                "eval.tasks / eval.text cannot run under FSDP (a sharded model cannot score "
                "items on one rank alone). Use DDP, or evaluate the checkpoints afterwards "
                "with `python -m tinyllm.evaluate`."
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step < self.next_step:
            return
        if self.every:
            self.next_step = (step // self.every + 1) * self.every
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)
        was_training = model.training
        model.eval()
        try:
            metrics = self.evaluate(model, trainer)
        finally:
            model.train(was_training)
        # The figures are already summed over ranks, the same on each: sync_dist averages
        # equal values (a no-op) and keeps Lightning from warning under DDP. Lightning logs
        # them as float32, as it does val/bpb.
        for k, v in metrics.items():
            pl_module.log(k, v, sync_dist=True)

    def evaluate(self, model: torch.nn.Module, trainer: L.Trainer) -> dict[str, float]:
        """All figures, summed over ranks (rank r takes items r, r + world, ...)."""
        rank, world = trainer.global_rank, trainer.world_size
        scorer = Scorer(model, self.tokenizer, self.batch_size)
        sums: list[float] = []
        for task in self.tasks:
            scores = score_items(scorer, task.items[rank::world])
            sums += [
                sum(s.pred == s.label for s in scores),
                sum(s.pred_norm == s.label for s in scores),
                len(scores),
            ]
        if self.files:
            sums += list(self._text_sums(scorer, rank, world))
        total = torch.tensor(sums, dtype=torch.float64, device=scorer.device)
        if world > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        total = total.tolist()
        out: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            right, right_norm, n = total[3 * i : 3 * i + 3]
            out[f"eval/{task.name}/acc"] = right / n
            out[f"eval/{task.name}/acc_norm"] = right_norm / n
        if self.files:
            nll, _ = total[3 * len(self.tasks) :]
            out[f"eval/{self.text_name}/bpb"] = nll / math.log(2) / self._bytes
        return out

    def _text_sums(self, scorer: Scorer, rank: int, world: int) -> tuple[float, float]:
        """(nll of this rank's windows, their scored tokens); every rank counts the bytes."""
        T = scorer.block_size
        stride = int(self.stride) if self.stride else max(1, T // 2)
        rows = [score_file(scorer, f, stride, rank=rank, world=world) for f in self.files]
        self._bytes = sum(r.bytes for r in rows)
        return sum(r.nll for r in rows), float(sum(r.tokens for r in rows))
