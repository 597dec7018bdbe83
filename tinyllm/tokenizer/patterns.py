"""Pre-tokenization split patterns.

Byte-level BPE never merges across the pieces these regexes cut text into, so words, numbers,
punctuation runs and whitespace runs are learned separately (" dog" and "dog." never become one
token). The names are the ones the GPT-2 and GPT-4 (cl100k) tokenizers ship with.
"""

from __future__ import annotations

import regex

from tinyllm.errors import TinyLLMError

# GPT-2 (r50k): contractions, optional-space + letters / numbers / other, whitespace runs.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4 (cl100k): case-insensitive contractions, numbers in groups of at most 3 digits,
# newlines kept apart from other whitespace. Possessive quantifiers (?+, ++) need `regex`.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "cl100k": GPT4_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """A built-in name ("gpt2", "gpt4") or a custom regex -> the regex source, checked."""
    if not isinstance(pattern, str) or not pattern:
        raise TinyLLMError(
            f"tokenizer pattern must be a non-empty string, got {pattern!r}; use one of "
            f"{sorted(PATTERNS)} or a regular expression (Python `regex` syntax)."
        )
    source = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(source)
    except regex.error as e:
        raise TinyLLMError(
            f"tokenizer pattern {pattern!r} is neither a built-in name {sorted(PATTERNS)} nor a "
            f"valid regular expression ({e}); fix the regex or pick a built-in name."
        ) from None
    return source


def pattern_name(source: str) -> str | None:
    """The built-in name of a regex source, if it is one (for readable files)."""
    for name in ("gpt2", "gpt4"):
        if PATTERNS[name] == source:
            return name
    return None
