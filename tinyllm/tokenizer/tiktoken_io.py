"""tiktoken ranks files: one `base64(token bytes) rank` pair per line; rank == token id.

tiktoken encodes by merging the adjacent pair whose *concatenation* has the lowest rank. We
store merges as pairs of ids, so each multi-byte token's pair is recovered by running that
same procedure on the token's own bytes with only lower ranks allowed: it stops at exactly two
parts, which are the pair that created it (as minbpe's GPT4Tokenizer does).
"""

from __future__ import annotations

import base64
import binascii
import os

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer.bpe import BPETokenizer


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TinyLLMError(f"cannot read tiktoken file {str(path)!r} ({e.strerror}).") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TinyLLMError(
                f"tiktoken file {str(path)!r} line {lineno} is malformed ({line[:60]!r}); "
                "expected `base64(token) rank`."
            ) from None
    if not ranks:
        raise TinyLLMError(f"tiktoken file {str(path)!r} holds no ranks.")
    return ranks


def _split_by_ranks(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge procedure on `token`, using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def ranks_to_merges(
    ranks: dict[bytes, int], source: str
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """-> (id of each byte value, merges (left id, right id, new id) in rank order)."""
    byte_ids = []
    for b in range(256):
        if bytes([b]) not in ranks:
            raise TinyLLMError(f"{source} has no token for byte {b}: not a byte-level BPE file.")
        byte_ids.append(ranks[bytes([b])])
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _split_by_ranks(ranks, token, rank)
        if len(parts) != 2:
            raise TinyLLMError(
                f"{source}: token {token!r} (rank {rank}) is not the merge of two lower-ranked "
                "tokens, so the file is not a BPE ranks file."
            )
        merges.append((ranks[parts[0]], ranks[parts[1]], rank))
    return byte_ids, merges


def read_tiktoken(
    path: str | os.PathLike,
    pattern: str = "gpt2",
    special_tokens: dict[str, int] | None = None,
    roles: dict[str, str | None] | None = None,
) -> BPETokenizer:
    """Import a tiktoken ranks file (`base64(token) rank` per line), e.g. gpt2.tiktoken.

    The file holds no split pattern and no special tokens: give them (GPT-2's are the
    "gpt2" pattern and {"<|endoftext|>": 50256})."""
    ranks = read_tiktoken_ranks(path)
    byte_ids, merges = ranks_to_merges(ranks, source=f"tiktoken file {str(path)!r}")
    return BPETokenizer(
        merges, pattern=pattern, special_tokens=special_tokens, byte_ids=byte_ids, roles=roles
    )
