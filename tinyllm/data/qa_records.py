"""Q&A files: read and validate a JSON array or JSON Lines file of question-answer records.

A leaf of tinyllm/data/: both the Q&A data module (qa.py) and the corpus sources (sources.py,
which can prepare a Q&A file as plain text) read records through here, so neither imports
the other. Every kind of bad input raises a TinyLLMError naming the file, the record (and
line) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinyllm.chat import ROLES, Message
from tinyllm.errors import TinyLLMError

_EXAMPLE = (
    '[{"question": "Who are you?", "answer": "I am TinyLLM."}] or, as JSON Lines, one '
    '{"question": ..., "answer": ...} per line'
)

# ---------------------------------------------------------------------------- loading


def load_qa_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a Q&A file; return records as {"messages": [...], "id"?: ...}.

    A pair becomes a user and an assistant message. Raises TinyLLMError naming the file, the
    record (and line) and the fix for every kind of bad input.
    """
    path = Path(path)
    if not path.is_file():
        raise TinyLLMError(
            f"Q&A file {str(path)!r} does not exist (or is not a file). Fix `data.path=` to "
            f"point at a JSON array or JSON Lines file of records like {_EXAMPLE}."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise TinyLLMError(
            f"Q&A file {str(path)!r} is not UTF-8 text ({e}). Fix: save it as UTF-8."
        ) from None
    stripped = text.lstrip()
    if not stripped:
        raise TinyLLMError(f"Q&A file {str(path)!r} is empty. Fix: add records like {_EXAMPLE}.")
    if stripped[0] == "[":
        raw = _parse_array(path, text)  # [(record, where)]
    else:
        raw = _parse_jsonl(path, text)
    if not raw:
        raise TinyLLMError(
            f"Q&A file {str(path)!r} holds no records. Fix: add records like {_EXAMPLE}."
        )
    return [_validate_record(path, rec, where) for rec, where in raw]


def _parse_array(path: Path, text: str) -> list[tuple[Any, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TinyLLMError(
            f"Q&A file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, column "
            f"{e.colno}. Fix the JSON there (a common cause is a missing comma between records "
            "or a trailing comma before `]`)."
        ) from None
    if not isinstance(data, list):
        raise TinyLLMError(
            f"Q&A file {str(path)!r} must hold a JSON array of records. Fix: write records "
            f"like {_EXAMPLE}."
        )
    lines = _array_item_lines(text, len(data))
    return [(rec, f"record {i + 1} (line {lines[i]})") for i, rec in enumerate(data)]


def _array_item_lines(text: str, n: int) -> list[int]:
    """Line number where each element of a (valid) top-level JSON array starts."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    starts = []
    for _ in range(n):
        while text[pos] in " \t\r\n,":
            pos += 1
        starts.append(pos)
        _, pos = dec.raw_decode(text, pos)
    return [text.count("\n", 0, s) + 1 for s in starts]


def _parse_jsonl(path: Path, text: str) -> list[tuple[Any, str]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines between records are harmless
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyLLMError(
                f"Q&A file {str(path)!r}, line {lineno}, column {e.colno}: invalid JSON "
                f"({e.msg}). Fix that line. The file is read as JSON Lines (one record per "
                "line) because it does not start with `[`; for a pretty-printed file, wrap the "
                "records in a JSON array `[...]`."
            ) from None
        out.append((rec, f"record {len(out) + 1} (line {lineno})"))
    return out


def _validate_record(path: Path, rec: Any, where: str) -> dict[str, Any]:
    at = f"Q&A file {str(path)!r}, {where}"
    if not isinstance(rec, dict):
        raise TinyLLMError(
            f"{at}: a record must be a JSON object, got {type(rec).__name__} ({_short(rec)}). "
            f"Fix: write records like {_EXAMPLE}."
        )
    if "id" in rec:
        at += f" (id {_short(rec['id'])})"
    if "messages" in rec:
        return {"messages": _validate_messages(at, rec["messages"]), **_keep_id(rec)}
    for key in ("question", "answer"):
        if key not in rec:
            raise TinyLLMError(
                f"{at}: missing `{key}` (keys present: {sorted(rec)}). Fix: give every record "
                'a `question` and an `answer` string, or a `messages` list of {"role", '
                '"content"} turns.'
            )
        _check_text(at, f"`{key}`", rec[key])
    messages = [
        {"role": "user", "content": rec["question"]},
        {"role": "assistant", "content": rec["answer"]},
    ]
    return {"messages": messages, **_keep_id(rec)}


def _validate_messages(at: str, messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise TinyLLMError(
            f'{at}: `messages` must be a non-empty list of {{"role", "content"}} objects, got '
            f"{_short(messages)}. Fix: list the turns, e.g. "
            '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}].'
        )
    out: list[Message] = []
    for i, m in enumerate(messages, 1):
        here = f"{at}, message {i}"
        if not isinstance(m, dict):
            raise TinyLLMError(
                f'{here}: must be an object {{"role": ..., "content": ...}}, got {_short(m)}. '
                "Fix: write each turn as such an object."
            )
        role = m.get("role")
        if role not in ROLES:
            raise TinyLLMError(
                f"{here}: unknown role {_short(role)}. Fix: use one of {list(ROLES)} "
                "(e.g. `user` for the question, `assistant` for the answer)."
            )
        if "content" not in m:
            raise TinyLLMError(f"{here}: missing `content`. Fix: add the message text.")
        _check_text(here, "`content`", m["content"])
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise TinyLLMError(
            f"{at}: the conversation has no `assistant` message, so there is nothing to learn "
            "(the loss covers answers only). Fix: add the answer as an assistant message."
        )
    return out


def _check_text(at: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TinyLLMError(
            f"{at}: {name} must be a string, got {type(value).__name__} ({_short(value)}). "
            'Fix: quote it, e.g. "42".'
        )
    if not value.strip():
        raise TinyLLMError(f"{at}: {name} is empty. Fix: write the text, or drop the record.")


def _keep_id(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": rec["id"]} if "id" in rec else {}


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
