"""A "which passage comes next?" task from any text, with no download.

    python -m tinyllm.eval.nextpassage text=FILE out=TASK.jsonl [items=200 choices=4 seed=0]

The text is cut at word boundaries into consecutive passages of about `context_chars` and
`continuation_chars` characters. An item shows one passage as context; the true continuation
is the passage that follows it, and the other choices are continuations drawn (seeded) from
elsewhere in the same text, so a model that has learned how this kind of text flows beats the
chance level while one that only knows word frequencies does not. Score it with a model that
did NOT train on this text (e.g. its held-out validation split), or it measures memory.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import regex

from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.eval.tasks import Item
from tinyllm.io import write_text_atomic

_WORD = regex.compile(r"\s*\S+")


def passages(text: str, context_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """Consecutive (context, continuation) pairs; a continuation keeps its leading space."""
    words = _WORD.findall(text)
    out, i = [], 0

    def take(n_chars: int) -> str:
        nonlocal i
        buf: list[str] = []
        size = 0
        while i < len(words) and size < n_chars:
            buf.append(words[i])
            size += len(words[i])
            i += 1
        return "".join(buf)

    while i < len(words):
        ctx = take(context_chars).strip()
        cont = take(continuation_chars)
        if size_ok(ctx, cont, continuation_chars):
            out.append((ctx, " " + cont.lstrip()))
    return out


def size_ok(ctx: str, cont: str, continuation_chars: int) -> bool:
    return bool(ctx) and len(cont.strip()) >= continuation_chars // 2


def make_items(
    text: str,
    n_items: int = 200,
    n_choices: int = 4,
    context_chars: int = 300,
    continuation_chars: int = 100,
    seed: int = 0,
) -> list[Item]:
    """Seeded items; TinyLLMError if the text is too short for the request."""
    if n_choices < 2 or n_items < 1:
        raise TinyLLMError(f"choices={n_choices} must be >= 2 and items={n_items} >= 1.")
    pairs = passages(text, context_chars, continuation_chars)
    if len(pairs) < max(n_choices, 2):
        raise TinyLLMError(
            f"The text gives only {len(pairs)} passages of {context_chars}+{continuation_chars} "
            f"characters, too few for {n_choices} choices. Use a longer text or smaller "
            "context_chars / continuation_chars."
        )
    rng = random.Random(seed)
    picks = rng.sample(range(len(pairs)), min(n_items, len(pairs)))
    items = []
    for j in picks:
        ctx, true = pairs[j]
        others = rng.sample([k for k in range(len(pairs)) if k != j], n_choices - 1)
        choices = [pairs[k][1] for k in others]
        label = rng.randrange(n_choices)
        choices.insert(label, true)
        items.append(Item(ctx, choices, label, f"passage-{j}"))
    return items


def write_items(items: list[Item], out: str | Path) -> Path:
    """JSONL in the native format, written to a temporary name and renamed."""
    rows = [
        {"id": it.id, "context": it.context, "choices": it.choices, "label": it.label}
        for it in items
    ]
    return write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run(cfg: Any) -> Path:
    from tinyllm.eval.text import _check_head, _pieces

    if not cfg.get("text") or not cfg.get("out"):
        raise TinyLLMError("Pass text=FILE (the source text) and out=TASK.jsonl (the task).")
    path = Path(str(cfg.text)).expanduser()
    if not path.is_file():
        raise TinyLLMError(f"text={cfg.text} is not a file. Pass one UTF-8 text file.")
    _check_head(path, str(cfg.get("bad_files", "replace")))
    text = "".join(_pieces(path))
    items = make_items(
        text,
        int(cfg["items"]),
        int(cfg.choices),
        int(cfg.context_chars),
        int(cfg.continuation_chars),
        int(cfg.seed),
    )
    out = write_items(items, str(cfg.out))
    print(f"wrote {out}: {len(items)} items, {cfg.choices} choices each", file=sys.stderr)
    return out


def main() -> None:
    import hydra

    from tinyllm.cli import hydra_entry

    @hydra.main(config_path="../../conf", config_name="nextpassage", version_base="1.3")
    def _main(cfg: Any) -> None:
        with exit_on_user_error():
            run(cfg)

    hydra_entry(_main, "nextpassage")  # a config typo: one paragraph and exit 2


if __name__ == "__main__":
    main()
