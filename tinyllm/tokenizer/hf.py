"""Hugging Face `tokenizer.json` (byte-level BPE) import and export.

HF stores tokens as strings, so GPT-2 maps each byte to a printable unicode character first
(`bytes_to_unicode`: printable ASCII/Latin-1 map to themselves, the rest to U+0100 upwards;
the space becomes 'Ġ'). A token string is its bytes pushed through that map, and merges are
pairs of token strings in priority order.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer.bpe import BPETokenizer, _atomic_write
from tinyllm.tokenizer.patterns import GPT2_PATTERN


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tok_str(b: bytes) -> str:
    m = bytes_to_unicode()
    return "".join(m[x] for x in b)


def to_hf_dict(tok: BPETokenizer) -> dict[str, Any]:
    """tokenizer.json for `tokenizers.Tokenizer.from_file`: Split(pattern) + ByteLevel."""
    vocab = {}
    for i in range(tok.vocab_size):
        if i not in tok.special_tokens.values():
            vocab[_tok_str(tok.token_bytes(i))] = i
    merges = [
        f"{_tok_str(tok.token_bytes(a))} {_tok_str(tok.token_bytes(b))}" for a, b, _ in tok.merges
    ]
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tok.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _find_pattern(pre: dict[str, Any] | None, source: str) -> str:
    """The split regex of a byte-level pre-tokenizer (Split + ByteLevel, or ByteLevel alone)."""
    steps = [] if pre is None else pre.get("pretokenizers", [pre])
    pattern = None
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise TinyLLMError(f"{source}: ByteLevel add_prefix_space=true is not supported.")
            if step.get("use_regex", True):
                pattern = GPT2_PATTERN
        elif kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise TinyLLMError(f"{source}: only Split(behavior=Isolated) is supported.")
            pat = step.get("pattern", {})
            pattern = pat.get("Regex") or __import__("regex").escape(pat.get("String", ""))
        else:
            raise TinyLLMError(
                f"{source}: pre-tokenizer {kind!r} is not supported "
                "(byte-level BPE needs Split and/or ByteLevel)."
            )
    if pattern is None:
        raise TinyLLMError(f"{source} has no split pattern (no Split/ByteLevel pre-tokenizer).")
    return pattern


def from_hf_dict(d: dict[str, Any], source: str) -> BPETokenizer:
    """A BPETokenizer from a parsed Hugging Face tokenizer.json."""
    try:
        model = d["model"]
        if model.get("type") != "BPE":
            raise TinyLLMError(f"{source} is a {model.get('type')!r} model, not byte-level BPE.")
        if d.get("normalizer") not in (None, {}):
            raise TinyLLMError(f"{source} uses a normalizer, which tinyllm does not support.")
        pattern = _find_pattern(d.get("pre_tokenizer"), source)
        vocab: dict[str, int] = model["vocab"]
        inv = {c: b for b, c in bytes_to_unicode().items()}
        byte_ids = []
        for b in range(256):
            s = bytes_to_unicode()[b]
            if s not in vocab:
                raise TinyLLMError(f"{source} lacks the byte token {s!r}: not byte-level BPE.")
            byte_ids.append(vocab[s])
        merges = []
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            merged = a + b
            if merged not in vocab:
                raise TinyLLMError(f"{source}: merge {a!r}+{b!r} has no vocab entry.")
            merges.append((vocab[a], vocab[b], vocab[merged]))
        specials = {t["content"]: int(t["id"]) for t in d.get("added_tokens", [])}
        for s in vocab:  # vocab tokens must be byte strings in the GPT-2 map
            if any(ch not in inv for ch in s) and s not in specials:
                raise TinyLLMError(f"{source}: vocab token {s!r} is not byte-level.")
        merged_ids = {n for _, _, n in merges} | set(byte_ids) | set(specials.values())
        extra = {s: i for s, i in vocab.items() if i not in merged_ids}
        specials.update(extra)  # e.g. GPT-2's <|endoftext|> sits in vocab and added_tokens
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, TinyLLMError):
            raise
        raise TinyLLMError(f"{source} is malformed ({type(e).__name__}: {e}).") from None
    return BPETokenizer(merges, pattern=pattern, special_tokens=specials, byte_ids=byte_ids)


def save_hf(tok: BPETokenizer, path: str | os.PathLike) -> None:
    """Write a tokenizer.json that the `tokenizers` library loads and encodes identically."""
    _atomic_write(Path(path), json.dumps(to_hf_dict(tok), ensure_ascii=False, indent=1))
