"""Scoring a multiple-choice task: accuracy, length-normalised accuracy, chance, intervals.

Each choice's score is log p(choice | context), summed over its tokens:
- acc:       the choice with the highest sum is the answer (favours short choices),
- acc_norm:  the highest sum per UTF-8 byte of the choice (lm-evaluation-harness divides by
             characters: the same for ASCII),
- chance:    the mean of 1 / (number of choices), what guessing scores,
- a 95% bootstrap interval (items resampled with replacement, percentile method, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyllm.eval.scoring import Scorer
from tinyllm.eval.tasks import Item


@dataclass
class ItemScore:
    id: str
    label: int
    loglikelihoods: list[float]
    choice_bytes: list[int]

    @property
    def pred(self) -> int:
        return int(np.argmax(self.loglikelihoods))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(np.asarray(self.loglikelihoods) / np.asarray(self.choice_bytes)))


def score_items(scorer: Scorer, items: Sequence[Item]) -> list[ItemScore]:
    """Every choice of every item, in as few forward passes as the batch size allows."""
    pairs, owners = [], []
    for n, item in enumerate(items):
        for choice in item.choices:
            pairs.append(scorer.encode_pair(item.context, choice))
            owners.append(n)
    lls = scorer.loglikelihood(pairs)
    out = [
        ItemScore(it.id, it.label, [], [len(c.encode("utf-8")) for c in it.choices]) for it in items
    ]
    for n, (ll, _) in zip(owners, lls):
        out[n].loglikelihoods.append(ll)
    return out


def bootstrap_ci(
    correct: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // len(correct))  # bounded memory: resample in blocks
    for b in range(0, n_boot, step):
        k = min(step, n_boot - b)
        idx = rng.integers(0, len(correct), size=(k, len(correct)))
        means[b : b + k] = correct[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(scores: Sequence[ItemScore], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """acc, acc_norm, chance and their intervals from the per-item scores."""
    correct = np.array([s.pred == s.label for s in scores], dtype=np.float64)
    correct_norm = np.array([s.pred_norm == s.label for s in scores], dtype=np.float64)
    chance = float(np.mean([1.0 / len(s.loglikelihoods) for s in scores]))
    return {
        "items": len(scores),
        "acc": float(correct.mean()),
        "acc_ci95": bootstrap_ci(correct, n_boot, seed),
        "acc_norm": float(correct_norm.mean()),
        "acc_norm_ci95": bootstrap_ci(correct_norm, n_boot, seed),
        "chance": chance,
        "correct": int(correct.sum()),
        "correct_norm": int(correct_norm.sum()),
    }
