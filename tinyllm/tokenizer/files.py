"""One function loads any tokenizer file, by its format: `load_tokenizer(path)`.

Three formats reach a BPETokenizer, and the file says which it is:

- tinyllm's own JSON (`"format": "tinyllm.bpe"`, written by `BPETokenizer.save`),
- a Hugging Face byte-level BPE `tokenizer.json` (a JSON object with a `"model"`; a folder
  means the tokenizer.json inside it),
- a tiktoken ranks file (`*.tiktoken`: `base64(token) rank` per line), which carries neither
  a split pattern nor special tokens, so those come from the arguments.

The readers live beside the core (bpe.py) and import it; the core imports none of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer.bpe import BPETokenizer
from tinyllm.tokenizer.hf import from_hf_dict
from tinyllm.tokenizer.tiktoken_io import read_tiktoken


def load_tokenizer(
    path: str | os.PathLike,
    pattern: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> BPETokenizer:
    """The tokenizer in `path`, whichever of the three formats it is in.

    `pattern` and `special_tokens` apply to a .tiktoken file only (defaults: "gpt2", and
    GPT-2's convention of one `<|endoftext|>` right after the ranks).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".tiktoken":
        if special_tokens is None:
            n = _count_ranks(path)
            special_tokens = {"<|endoftext|>": n}
        return read_tiktoken(path, pattern=pattern or "gpt2", special_tokens=special_tokens)
    d, source = _read_json(path, "tokenizer file")
    if isinstance(d, dict) and "model" in d and "format" not in d:
        return from_hf_dict(d, source=f"Hugging Face {source}")
    return BPETokenizer.from_dict(d, source=source)


def read_hf(path: str | os.PathLike) -> BPETokenizer:
    """Import a Hugging Face byte-level BPE tokenizer.json (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    d, source = _read_json(path, "Hugging Face tokenizer file")
    if not isinstance(d, dict):
        raise TinyLLMError(f"{source} is not a tokenizer.json object.")
    return from_hf_dict(d, source)


def _read_json(path: Path, what: str) -> tuple[Any, str]:
    """(parsed JSON, "<what> '<path>'" for messages), or a TinyLLMError saying what failed."""
    source = f"{what} {str(path)!r}"
    try:
        return json.loads(path.read_text(encoding="utf-8")), source
    except OSError as e:
        raise TinyLLMError(f"cannot read {source} ({e.strerror}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLLMError(
            f"{source} is not valid JSON ({e}); a tokenizer file is tinyllm's tokenizer.json "
            "(BPETokenizer.save, python -m tinyllm.prepare), a Hugging Face tokenizer.json, or "
            "a .tiktoken ranks file (named *.tiktoken)."
        ) from None


def _count_ranks(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise TinyLLMError(f"cannot read tiktoken file {str(path)!r} ({e.strerror}).") from None
