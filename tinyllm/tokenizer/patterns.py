"""Pre-tokenization split patterns.

Byte-level BPE never merges across the pieces these regexes cut text into, so words, numbers,
punctuation runs and whitespace runs are learned separately (" dog" and "dog." never become one
token). The names are the ones the GPT-2 and GPT-4 (cl100k) tokenizers ship with.

A custom regex is accepted, but a regex can take exponential time ("catastrophic
backtracking": `(a|a)+$|.` needs ~50 s for 26 characters), and tokenizer files come from
strangers. So a custom pattern is (1) probed when it is loaded, on short strings where a sane
pattern takes microseconds, and refused if a probe takes over PROBE_TIMEOUT_S; (2) time-limited
on every text it splits: CUSTOM_TIMEOUT_S plus CUSTOM_S_PER_CHAR per character (a 100 kB/s
floor, far below any usable pattern), after which encoding stops with a clear error. The
built-in patterns are linear-time and run without a limit.
"""

from __future__ import annotations

from collections.abc import Callable

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

PROBE_TIMEOUT_S = 0.25  # a probe (<= 64 characters) slower than this: the pattern is refused
CUSTOM_TIMEOUT_S = 10.0  # time limit of one split with a custom pattern: this ...
CUSTOM_S_PER_CHAR = 1e-5  # ... plus this per character of the text
# Runs of one character class, then a character that makes a trailing `$` or lookahead fail:
# the inputs on which nested or overlapping quantifiers backtrack exponentially.
_PROBES = [c * 40 + end for c in ("a", "A", "1", " ", "é", "\n", "ab", ".") for end in ("!", "")]


def resolve_pattern(pattern: str) -> str:
    """A built-in name ("gpt2", "gpt4") or a custom regex -> the regex source, checked."""
    if not isinstance(pattern, str) or not pattern:
        raise TinyLLMError(
            f"tokenizer pattern must be a non-empty string, got {pattern!r}; use one of "
            f"{sorted(PATTERNS)} or a regular expression (Python `regex` syntax)."
        )
    source = PATTERNS.get(pattern, pattern)
    try:
        compiled = regex.compile(source)
    except regex.error as e:
        raise TinyLLMError(
            f"tokenizer pattern {pattern!r} is neither a built-in name {sorted(PATTERNS)} nor a "
            f"valid regular expression ({e}); fix the regex or pick a built-in name."
        ) from None
    if pattern_name(source) is None:
        _probe(compiled, pattern)
    return source


def _probe(compiled: regex.Pattern, pattern: str) -> None:
    for text in _PROBES:
        try:
            compiled.findall(text, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            raise TinyLLMError(
                f"tokenizer pattern {pattern!r} took over {PROBE_TIMEOUT_S:g} s to split the "
                f"{len(text)}-character text {text!r}: it backtracks catastrophically (nested "
                "or overlapping quantifiers such as (a|a)+ or (a+)+). Use a built-in pattern "
                f"{sorted(PATTERNS)} or rewrite the regex (possessive quantifiers ++ help)."
            ) from None


def splitter(source: str) -> Callable[[str], list[str]]:
    """`text -> chunks` for a resolved pattern; time-limited unless it is a built-in one."""
    compiled = regex.compile(source)
    if pattern_name(source) is not None:
        return compiled.findall

    def split(text: str) -> list[str]:
        limit = CUSTOM_TIMEOUT_S + CUSTOM_S_PER_CHAR * len(text)
        try:
            return compiled.findall(text, timeout=limit)
        except TimeoutError:
            raise TinyLLMError(
                f"the tokenizer's custom split pattern {source[:80]!r} took over {limit:.0f} s "
                f"on a text of {len(text):,} characters (the limit for custom patterns; see "
                "tinyllm/tokenizer/patterns.py): it backtracks on this text. Use a built-in "
                f"pattern {sorted(PATTERNS)} or rewrite the regex."
            ) from None

    return split


def pattern_name(source: str) -> str | None:
    """The built-in name of a regex source, if it is one (for readable files)."""
    for name in ("gpt2", "gpt4"):
        if PATTERNS[name] == source:
            return name
    return None
