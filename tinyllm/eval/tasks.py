"""Multiple-choice tasks: the file formats and where the files come from.

The native format is JSON Lines, one item per line (contract):

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

with an optional "id". A choice is scored as written (put the space that separates it from
the context at its start, as above). HellaSwag's layout (`ctx`, `endings`, `label`) is read
too: the context is `ctx` and each ending gets a leading space (llm.c's reading).

A `tasks=` entry is a path to such a file, or `hellaswag` (its validation set, downloaded once
into the cache and checked against its sha256).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm.data.sources import cache_dir, download
from tinyllm.errors import TinyLLMError
from tinyllm.io import sha256_file

HELLASWAG = {
    "url": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    # Unknown offline when this was written, so not invented: the first download records the
    # sha256 beside the cached file (trust on first use) and every later run checks it.
    "sha256": None,
    "filename": "hellaswag_val.jsonl",
}


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    id: str


@dataclass
class Task:
    name: str
    path: Path
    sha256: str
    items: list[Item]


def _bad(where: str, problem: str) -> TinyLLMError:
    return TinyLLMError(
        f"{where}: {problem}. Each line must be a JSON object "
        '{"context": str, "choices": [str, ...], "label": int} (optional "id"), or HellaSwag\'s '
        '{"ctx", "endings", "label"}; fix or remove that line.'
    )


def parse_item(obj: Any, where: str, index: int) -> Item:
    """One decoded JSON line -> Item, or a TinyLLMError naming file:line and the problem."""
    if not isinstance(obj, dict):
        raise _bad(where, f"expected a JSON object, got {type(obj).__name__}")
    if "ctx" in obj and "endings" in obj and "context" not in obj:  # HellaSwag
        obj = {
            "context": obj["ctx"],
            "choices": [" " + e if isinstance(e, str) else e for e in obj["endings"]],
            "label": obj.get("label"),
            "id": obj.get("ind", obj.get("id")),
        }
    missing = [k for k in ("context", "choices", "label") if k not in obj]
    if missing:
        raise _bad(where, f"missing field(s) {missing} (has {sorted(obj)[:8]})")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise _bad(where, f'"context" must be a string, got {type(context).__name__}')
    if not isinstance(choices, list) or not choices:
        raise _bad(where, '"choices" must be a non-empty list of strings')
    if not all(isinstance(c, str) and c for c in choices):
        raise _bad(where, 'every entry of "choices" must be a non-empty string')
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # HellaSwag stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int):
        raise _bad(where, f'"label" must be an integer index into "choices", got {label!r}')
    if not 0 <= label < len(choices):
        raise _bad(where, f'"label" {label} is out of range for {len(choices)} choices')
    item_id = obj.get("id")
    return Item(context, list(choices), label, str(item_id if item_id is not None else index))


def read_jsonl(path: Path) -> list[Item]:
    items: list[Item] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _bad(f"{path}:{n}", f"not valid JSON ({e.msg})") from None
                items.append(parse_item(obj, f"{path}:{n}", len(items)))
    except UnicodeDecodeError as e:
        raise TinyLLMError(
            f"task file {path} is not valid UTF-8 (byte {e.start}). Save it as UTF-8."
        ) from None
    except OSError as e:
        raise TinyLLMError(f"Cannot read task file {path} ({e.strerror}).") from None
    if not items:
        raise TinyLLMError(f"task file {path} holds no items. Add JSON lines or drop it.")
    return items


def hellaswag_path(url: str | None = None, sha256: str | None = None) -> Path:
    """HellaSwag's validation set in the cache (downloaded once, sha256-checked)."""
    url = url or HELLASWAG["url"]
    dest = cache_dir() / "tasks" / HELLASWAG["filename"]
    return download(url, dest, sha256 or HELLASWAG["sha256"], local_hint="hellaswag_val.jsonl")


def load_task(spec: str, limit: int | None = None) -> Task:
    """A tasks= entry -> Task (items, the file's sha256). `limit` keeps the first N items."""
    if spec == "hellaswag":
        path, name = hellaswag_path(), "hellaswag"
    else:
        path = Path(spec).expanduser()
        name = path.stem
        if not path.is_file():
            raise TinyLLMError(
                f"task {spec!r} is neither a file nor a known task name (hellaswag). Pass the "
                "path of a JSONL task file, e.g. tasks=[examples/tasks/arithmetic.jsonl]."
            )
    items = read_jsonl(path)
    if limit is not None:
        items = items[: int(limit)]
    return Task(name, path, sha256_file(path), items)


def task_digest(items: list[Item]) -> str:
    """A checksum of the items themselves (for generated tasks held in memory)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.context, it.choices, it.label]).encode())
    return h.hexdigest()
