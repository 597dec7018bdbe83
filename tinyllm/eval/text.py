"""Bits per byte of any text: a file, a folder (one row per file and a total) or a glob.

Each file is one document: its tokens follow the tokenizer's BOS (else EOS, the token training
puts between documents), so its first token is scored too; every token is scored exactly once
by sliding windows (`stride`, see Scorer.windows). The file is read in blocks, decoded
incrementally and encoded in pieces cut where the tokens of the whole text do not change (the
cut rule of prepare), so memory stays bounded whatever the file size.

    bits per byte = - sum log p(token) / ln 2 / (UTF-8 bytes of the text)

Bad files follow prepare's policy (`bad_files`): empty or binary files are an error, invalid
UTF-8 is decoded with U+FFFD (`replace`, with a warning; the bytes counted are then those of
the decoded text), left out (`skip`), or an error (`error`).
"""

from __future__ import annotations

import codecs
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyllm.data.sources import (
    READ_BYTES,
    _split_stream,
    is_binary,
    resolve_text_paths,
    scan_bytes,
)
from tinyllm.errors import TinyLLMError
from tinyllm.eval.scoring import Scorer

POLICIES = ("replace", "skip", "error")


@dataclass
class TextScore:
    """Sums for one file (or the total): every figure derives from these three."""

    name: str
    nll: float = 0.0  # nats, summed over the scored tokens
    tokens: int = 0  # scored tokens
    bytes: int = 0  # UTF-8 bytes those tokens stand for
    bad_utf8: bool = False

    def add(self, other: TextScore) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes

    def figures(self) -> dict[str, Any]:
        d = asdict(self)
        d["nats_per_token"] = self.nll / self.tokens if self.tokens else math.nan
        d["bpb"] = self.nll / math.log(2) / self.bytes if self.bytes else math.nan
        d["perplexity"] = math.exp(min(d["nats_per_token"], 700.0))
        return d


def text_files(spec: str) -> list[Path]:
    """text= FILE | DIR (recursive, every file) | GLOB -> sorted files."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise TinyLLMError(f"text={spec} is an empty folder. Point text= at text files.")
        return files
    if not p.exists() and not any(c in spec for c in "*?["):
        raise TinyLLMError(
            f"text={spec} does not exist (looked for a file, a folder or a glob). Fix the path "
            "(relative to the directory you run from)."
        )
    return resolve_text_paths(spec, extensions=("",))


def _check_head(path: Path, policy: str) -> bool:
    """Empty/binary -> error; returns whether the file is valid UTF-8 (one streaming pass)."""
    try:
        with open(path, "rb") as f:
            n, valid, head = scan_bytes(iter(lambda: f.read(READ_BYTES), b""))
    except OSError as e:
        raise TinyLLMError(f"Cannot read text file {path} ({e.strerror}).") from None
    if is_binary(head):
        raise TinyLLMError(
            f"text file {path} looks binary (it contains NUL bytes), not text. "
            "Remove it from text=, or point text= at the text files only."
        )
    if n == 0 or (n <= 3 and path.read_bytes() == codecs.BOM_UTF8[:n]):
        raise TinyLLMError(f"text file {path} is empty. Remove it from text= or give it text.")
    if not valid and policy == "error":
        raise TinyLLMError(
            f"text file {path} is not valid UTF-8. Convert it (e.g. iconv -f latin1 -t utf-8), "
            "or pass bad_files=replace (decode with U+FFFD) or bad_files=skip."
        )
    return valid


def _pieces(path: Path) -> Iterator[str]:
    """The decoded text in pieces whose separate encodings concatenate to the whole's."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def chunks() -> Iterator[str]:
        with open(path, "rb") as f:
            first = True
            while block := f.read(READ_BYTES):
                if first and block.startswith(codecs.BOM_UTF8):
                    block = block[3:]
                first = False
                yield dec.decode(block)
        yield dec.decode(b"", final=True)

    for piece, _ in _split_stream(chunks(), None):
        yield piece


def score_file(
    scorer: Scorer,
    path: Path,
    stride: int,
    name: str | None = None,
    rank: int = 0,
    world: int = 1,
) -> TextScore:
    """Stream one file through the sliding windows; returns its sums. With world > 1 only
    windows rank, rank + world, ... are scored (their nll and tokens); bytes count the file."""
    score = TextScore(name or str(path))
    prefix = scorer.prefix_id
    first_bytes = 0

    def tokens() -> Iterator[int]:
        nonlocal first_bytes
        if prefix is not None:
            yield prefix
        for piece in _pieces(path):
            score.bytes += len(piece.encode("utf-8"))
            ids = scorer.tokenizer.encode(piece)
            if prefix is None and not first_bytes and ids:  # unscored first token
                first_bytes = len(scorer.tokenizer.token_bytes(ids[0]))
            yield from ids

    pending = []
    for i, w in enumerate(scorer.windows(tokens(), stride)):
        if i % world != rank:
            continue
        pending.append(w)
        score.tokens += w.n_scored
        if len(pending) == scorer.batch_size:
            score.nll -= sum(scorer.score_windows(pending))
            pending = []
    score.nll -= sum(scorer.score_windows(pending))
    score.bytes -= first_bytes
    return score


def _prefix_note(scorer: Scorer) -> str:
    tok = scorer.tokenizer
    if scorer.prefix_id is None:
        return "no BOS/EOS: each file's first token unscored"
    return f"each file follows {'BOS' if tok.bos_id is not None else 'EOS'}"


def score_text(
    scorer: Scorer, spec: str, stride: int | None = None, bad_files: str = "replace"
) -> dict[str, Any]:
    """text= -> {"files": [row per file], "total": row, "stride", "windows"}."""
    if bad_files not in POLICIES:
        raise TinyLLMError(f"bad_files={bad_files!r} is not a policy; use one of {POLICIES}.")
    T = scorer.block_size
    stride = int(stride) if stride else max(1, T // 2)
    if not 1 <= stride <= T:
        raise TinyLLMError(f"stride={stride} must be between 1 and block_size={T}.")
    files = text_files(spec)
    root = Path(spec).expanduser()
    valid = {f: _check_head(f, bad_files) for f in files}  # all checks before any scoring
    bad = [str(f) for f, ok in valid.items() if not ok]
    if bad:
        action = "left out" if bad_files == "skip" else "decoded with U+FFFD"
        warnings.warn(f"{len(bad)} file(s) not valid UTF-8 ({action}): {bad[:3]}", stacklevel=2)
    total, rows = TextScore("total"), []
    for f in files:
        if not valid[f] and bad_files == "skip":
            continue
        name = f.relative_to(root).as_posix() if root.is_dir() else str(f)
        row = score_file(scorer, f, stride, name)
        row.bad_utf8 = not valid[f]
        total.add(row)
        rows.append(row.figures())
    if not rows:
        raise TinyLLMError(f"text={spec}: every file was left out (bad_files=skip).")
    return {
        "spec": spec,
        "stride": stride,
        "block_size": T,
        "windows": "non-overlapping" if stride == T else f"sliding, stride {stride} of {T}",
        "prefix": _prefix_note(scorer),
        "files": rows,
        "total": total.figures(),
    }
