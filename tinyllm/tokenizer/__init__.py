"""Byte-level BPE tokenizer, written from scratch: `from tinyllm.tokenizer import BPETokenizer`.

Read in this order: patterns.py (how text is cut into chunks), train.py (how merges are
learned), bpe.py (encode/decode and its own file), tiktoken_io.py and hf.py (interop: they
import bpe.py, never the reverse), files.py (`load_tokenizer`: any file, by its format).
"""

from __future__ import annotations

from tinyllm.tokenizer.bpe import DEFAULT_SPECIALS, BPETokenizer
from tinyllm.tokenizer.files import load_tokenizer, read_hf
from tinyllm.tokenizer.hf import save_hf
from tinyllm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from tinyllm.tokenizer.tiktoken_io import read_tiktoken

__all__ = [
    "BPETokenizer",
    "DEFAULT_SPECIALS",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "load_tokenizer",
    "read_hf",
    "read_tiktoken",
    "save_hf",
]
