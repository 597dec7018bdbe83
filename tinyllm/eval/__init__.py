"""Evaluation: bits per byte of any text, multiple-choice tasks, lm-evaluation-harness.

    Scorer            log-likelihoods from a GPT (context once for shared-context choices)
    score_text        bits per byte / nats per token / perplexity, sliding windows
    load_task         a JSONL task file (native or HellaSwag layout) or `hellaswag`
    score_items, summarize   acc, acc_norm, chance, bootstrap intervals
The command is `python -m tinyllm.evaluate` (tinyllm/evaluate.py).
"""

from tinyllm.eval.multiple_choice import score_items, summarize
from tinyllm.eval.scoring import Scorer
from tinyllm.eval.tasks import Item, Task, load_task
from tinyllm.eval.text import score_text

__all__ = ["Item", "Scorer", "Task", "load_task", "score_items", "score_text", "summarize"]
