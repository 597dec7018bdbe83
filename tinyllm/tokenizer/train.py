"""BPE training: learn merges from chunk counts, touching only what each merge changes.

The naive loop (minbpe's teaching version) recounts every adjacent pair of the whole corpus
after every merge: O(corpus x merges). Here:

1. Pre-tokenize once. Text is cut into chunks by the split regex and identical chunks are
   counted together, so " the" costs one entry however often it occurs. Text is read in
   blocks, so a file of any size trains in bounded memory (the chunk table only).
2. Keep pair statistics: `stats[(a, b)]` = occurrences of the adjacent pair weighted by chunk
   count, and `where[(a, b)]` = the chunks that contain it.
3. A max-heap of pairs by count with lazy invalidation: when a count changes we push a fresh
   entry and leave the old one; a popped entry whose count no longer matches is stale and
   skipped. Merging a pair rewrites only the chunks in `where[pair]` and updates the counts of
   the neighbouring pairs in those chunks.

Tie-breaking (deterministic, documented, identical in the C fast path): the pair with the
highest count wins; among equal counts the smallest (left id, right id) wins.
"""

from __future__ import annotations

import heapq
import io
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer.patterns import splitter

# Optional C fast path (setup.py builds it; identical results to the Python here and in
# bpe.py). TINYLLM_PURE_PYTHON=1 switches it off, e.g. to step through the Python in a debugger.
_fastbpe = None
if not os.environ.get("TINYLLM_PURE_PYTHON"):
    try:
        from tinyllm.tokenizer import _fastbpe
    except ImportError:  # pragma: no cover - depends on the build
        _fastbpe = None

BLOCK_CHARS = 1 << 20  # text is pre-tokenized in ~1M-character blocks (bounded memory)


def _blocks(text: str | io.TextIOBase) -> Iterator[str]:
    """Yield a string (or an open text file) in ~BLOCK_CHARS pieces."""
    if isinstance(text, str):
        for i in range(0, len(text), BLOCK_CHARS):
            yield text[i : i + BLOCK_CHARS]
    else:
        while block := text.read(BLOCK_CHARS):
            yield block


def count_chunks(
    source: str | Path | Iterable[str | Path], pattern: str, verbose: bool = False
) -> Counter[str]:
    """Count the pre-tokenized chunks of a corpus: a str, a file Path, or an iterable of either.

    Each str in an iterable is one document (chunks never span documents). Blocks of one
    document are joined exactly: the last chunk of a block is carried over to the next block,
    because it might continue there (e.g. a whitespace run or a word cut in half). This is
    exact for patterns that look at most one character ahead and never behind (gpt2, gpt4).
    """
    split = splitter(pattern)  # (time-limited for a custom regex)
    counts: Counter[str] = Counter()
    docs = [source] if isinstance(source, (str, os.PathLike)) else source
    n_bytes, t0 = 0, time.perf_counter()
    for doc in docs:
        if isinstance(doc, os.PathLike):
            try:
                f = open(doc, encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115
            except OSError as e:
                raise TinyLLMError(
                    f"cannot read training file {str(doc)!r} ({e.strerror}); check the path."
                ) from None
            blocks = _blocks(f)
        elif isinstance(doc, str):
            f, blocks = None, _blocks(doc)
        else:
            raise TinyLLMError(
                f"tokenizer training input must be a str, a Path, or an iterable of those; got "
                f"an item of type {type(doc).__name__}. Pass text (or Path objects for files)."
            )
        carry = ""
        for block in blocks:
            pieces = split(carry + block)
            carry = pieces.pop() if pieces else ""
            counts.update(pieces)
            n_bytes += len(block)
            if verbose:
                rate = n_bytes / max(time.perf_counter() - t0, 1e-9) / 1e6
                print(
                    f"\rpre-tokenizing: {n_bytes / 1e6:.1f}M chars ({rate:.1f}M/s), "
                    f"{len(counts)} unique chunks",
                    end="",
                    file=sys.stderr,
                )
        if carry:
            counts.update(split(carry))
        if f is not None:
            f.close()
    if verbose:
        print(file=sys.stderr)
    counts.pop("", None)
    return counts


def text_to_bytes(s: str) -> bytes:
    """UTF-8 bytes of a str; undecodable bytes read with surrogateescape come back as bytes."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return s.encode("utf-8", errors="surrogatepass")  # lone surrogates: keep, don't crash


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, by `new`."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges_py(
    words: list[list[int]], counts: list[int], num_merges: int, verbose: bool = False
) -> list[tuple[int, int]]:
    """The readable reference: merges in order; merge i creates token id 256 + i."""
    stats: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            stats[pair] += c
            where[pair].add(i)
    # heapq is a min-heap: (-count, a, b) pops the highest count, then the smallest pair.
    heap = [(-c, a, b) for (a, b), c in stats.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    while len(merges) < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        if stats.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry: this pair's count changed after it was pushed
        new = 256 + len(merges)
        merges.append((a, b))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop((a, b)):
            w, c = words[i], counts[i]
            merged = _merge_word(w, a, b, new)
            if len(merged) == len(w):
                continue  # lazily kept index: this chunk no longer holds the pair
            for pair in zip(w, w[1:]):
                delta[pair] -= c
            for pair in zip(merged, merged[1:]):
                delta[pair] += c
                where[pair].add(i)
            words[i] = merged
        for pair, d in delta.items():
            if d == 0:
                continue
            c = stats[pair] + d
            if c > 0:
                stats[pair] = c
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                stats.pop(pair, None)
        stats.pop((a, b), None)
        if verbose and (len(merges) % 1000 == 0 or len(merges) == num_merges):
            dt = time.perf_counter() - t0
            print(
                f"\rmerges: {len(merges)}/{num_merges} ({dt:.1f}s), last count {-neg}",
                end="",
                file=sys.stderr,
            )
    if verbose:
        print(file=sys.stderr)
    return merges


def learn_merges(
    chunk_counts: Counter[str] | dict[str, int],
    num_merges: int,
    verbose: bool = False,
    use_c: bool | None = None,
) -> list[tuple[int, int]]:
    """Merges for a chunk-count table (C fast path when built, else the Python reference)."""
    items = sorted(chunk_counts.items())  # fixed order: results never depend on dict order
    words = [list(text_to_bytes(s)) for s, _ in items]
    counts = [c for _, c in items]
    if use_c is None:
        use_c = _fastbpe is not None
    if use_c:
        if _fastbpe is None:
            raise TinyLLMError("the C tokenizer extension is not built; run `pip install -e .`")
        return _fastbpe.learn_merges([bytes(w) for w in words], counts, num_merges, verbose)
    return learn_merges_py(words, counts, num_merges, verbose)
