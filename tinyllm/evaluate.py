"""`python -m tinyllm.evaluate ckpt=...`: score any checkpoint on text and on tasks.

    python -m tinyllm.evaluate ckpt=PATH|RUN_DIR|latest [text=FILE|DIR|GLOB] [tasks=[...]]
                               [out=FILE.json]                                     (contract)

- text=   bits per UTF-8 byte, nats per token and perplexity (sliding windows, `stride=`)
- tasks=  multiple-choice JSONL files (acc, acc_norm, chance, 95% bootstrap intervals)
- harness_tasks=  lm-evaluation-harness tasks, run with tinyllm's model class (tinyllm.eval.harness)

A table goes to stdout; `out=` writes every figure, per-item log-likelihoods, the
checkpoint's and task files' sha256 and the settings to one JSON file (atomically).
The library lives in tinyllm.eval (Scorer, score_text, score_items, summarize).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from tinyllm.errors import TinyLLMError, exit_on_user_error


def _list(cfg: DictConfig, key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, ListConfig | list | tuple):
        return [str(v) for v in value]
    raise TinyLLMError(f"`{key}={value}` must be a list, e.g. {key}='[a.jsonl,b.jsonl]'.")


def _int(cfg: DictConfig, key: str, minimum: int) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TinyLLMError(f"`{key}={value}` must be an integer >= {minimum}.")
    return value


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Everything the command computes, as one plain dict (also what out= holds)."""
    from tinyllm.eval.multiple_choice import score_items, summarize
    from tinyllm.eval.scoring import Scorer, load
    from tinyllm.eval.tasks import load_task
    from tinyllm.eval.text import score_text
    from tinyllm.io import sha256_file

    text, tasks, harness = cfg.get("text"), _list(cfg, "tasks"), _list(cfg, "harness_tasks")
    if not (text or tasks or harness):
        raise TinyLLMError(
            "Nothing to evaluate: pass text=FILE|DIR|GLOB, tasks='[FILE.jsonl,...]' and/or "
            "harness_tasks='[...]'. Example task files are in examples/tasks/."
        )
    limit = _int(cfg, "limit", 1)
    loaded = [load_task(t, limit) for t in tasks]  # bad task files fail before any scoring
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model, tokenizer, path = load(cfg.get("ckpt"), str(cfg.device), str(cfg.dtype))
    scorer = Scorer(model, tokenizer, batch_size=_int(cfg, "batch_size", 1) or 16)
    settings = OmegaConf.to_container(cfg, resolve=True)
    result: dict[str, Any] = {
        "checkpoint": {"path": str(path), "sha256": sha256_file(path)},
        "model": model.config.to_dict(),
        "settings": settings,
    }
    t0 = time.perf_counter()
    if text:
        result["text"] = score_text(scorer, str(text), _int(cfg, "stride", 1), cfg.bad_files)
    if loaded:
        result["tasks"] = {}
    for task in loaded:
        scores = score_items(scorer, task.items)
        m = summarize(scores, int(cfg.bootstrap), int(cfg.seed))
        m.update(file=str(task.path), sha256=task.sha256)
        m["per_item"] = [
            {"id": s.id, "label": s.label, "loglikelihoods": s.loglikelihoods, "pred": s.pred}
            | {"pred_norm": s.pred_norm, "choice_bytes": s.choice_bytes}
            for s in scores
        ]
        result["tasks"][task.name] = m
    if harness:
        from tinyllm.eval.harness import run_harness

        result["harness"] = run_harness(
            model,
            tokenizer,
            harness,
            cfg.get("harness_include"),
            cfg.get("harness_limit"),
            scorer.batch_size,
        )
    result["seconds"] = time.perf_counter() - t0
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    from tinyllm.eval.report import print_tables, write_json

    out = cfg.get("out")
    if out and Path(str(out)).is_dir():
        raise TinyLLMError(f"out={out} is a folder; pass a file name such as out=eval.json.")
    result = evaluate(cfg)
    print_tables(result)
    if out:
        write_json(result, str(out))
        print(f"wrote {out}", file=sys.stderr)
    return result


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.formatwarning = _format_warning
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(main, "evaluate")  # a config typo: one paragraph and exit 2, like bad input
