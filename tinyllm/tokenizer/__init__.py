"""Byte-level BPE tokenizer, written from scratch: `from tinyllm.tokenizer import BPETokenizer`.

Read in this order: patterns.py (how text is cut into chunks), train.py (how merges are
learned), bpe.py (encode/decode and files), tiktoken_io.py and hf.py (interop).
"""

from __future__ import annotations

from tinyllm.tokenizer.bpe import DEFAULT_SPECIALS, BPETokenizer
from tinyllm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS

__all__ = ["BPETokenizer", "DEFAULT_SPECIALS", "GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS"]
