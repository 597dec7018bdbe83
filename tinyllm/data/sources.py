"""Corpus sources: where the text comes from, as a lazy stream of raw units.

Every source yields *units*: `(name, bytes)` pairs, one per file (or per documentation topic).
Keeping raw bytes, not str, lets one piece of code do the three jobs every source needs:
hash the content (so prepare can reuse its output), apply the bad-file policy (empty, binary,
non-UTF-8) and count what it did, and stream huge files without reading them whole.

Sources (the `source:` key of a conf/data/*.yaml):
  pydocs       Python's own bundled documentation (pydoc_data.topics), one doc per topic
  stdlib       the standard library's .py files (no site-packages), one doc per file
  text         data.path = a file, a folder (recursive) or a glob; one doc per file, or split
               on data.separator
  shakespeare  Tiny Shakespeare, downloaded once into the cache (or data.path = a local copy)
  tinystories  TinyStories (a Hugging Face file), downloaded once, stories split on
               <|endoftext|>
  url          any text file by data.url (+ data.sha256)
  qa           the Q&A JSON format of the fine-tuning code (tinyllm/data/qa.py)
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from tinyllm.errors import TinyLLMError
from tinyllm.io import sha256_file, write_text_atomic

# Text inside a huge document is handed out in pieces of about this many bytes, so encoding
# runs in parallel and memory stays bounded whatever the file size.
PIECE_BYTES = 1 << 18
READ_BYTES = 1 << 22
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex")


# --------------------------------------------------------------------------------------------
# Units: (name, bytes) from files or memory


@dataclass
class Unit:
    """One raw input: a file on disk (read lazily, in blocks) or bytes in memory."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def blocks(self, size: int | None = None) -> Iterator[bytes]:
        size = size or READ_BYTES
        if self.data is not None:
            for i in range(0, len(self.data), size):
                yield self.data[i : i + size]
            return
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                while block := f.read(size):
                    yield block
        except OSError as e:
            raise TinyLLMError(
                f"Cannot read {self.path} ({e.strerror}). Check that it exists and is readable "
                "(and is not moved or deleted while prepare runs), or remove it from data.path."
            ) from None


@dataclass
class Source:
    """A named corpus: a list of units and how to cut them into documents."""

    name: str
    kind: str
    units: Callable[[], Iterator[Unit]]
    separator: str | None = None  # None: one document per unit
    info: dict[str, Any] = field(default_factory=dict)  # path/url/sha256 for meta.json


def cfg_get(cfg: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """cfg[key], with None (absent or null) meaning `default`."""
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None else value


def _pydocs(cfg: Mapping[str, Any]) -> Source:
    from pydoc_data.topics import topics  # ships with every CPython

    def units() -> Iterator[Unit]:
        for key in sorted(topics):
            yield Unit(name=f"pydoc_data.topics:{key}", data=topics[key].encode("utf-8"))

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Source("pydocs", "pydocs", units, info={"python": version})


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a sorted (deterministic) order, no site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted in place: os.walk then visits sub-folders in a fixed order
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib(cfg: Mapping[str, Any]) -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])

    def units() -> Iterator[Unit]:
        for p in stdlib_files():
            yield Unit(name=p.relative_to(root).as_posix(), path=p)

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Source("stdlib", "stdlib", units, info={"python": version, "root": str(root)})


def resolve_text_paths(path: str, extensions: tuple[str, ...] | None = None) -> list[Path]:
    """data.path -> sorted files: a file, a folder (recursive, by extension) or a glob."""
    exts = tuple(e if e.startswith(".") else f".{e}" for e in (extensions or DEFAULT_EXTENSIONS))
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts]
        if not files:
            raise TinyLLMError(
                f"data.path={path} is a folder without files ending in {', '.join(exts)}. Put "
                "text files there, or set data.extensions=[...] to the endings you use."
            )
        return sorted(files, key=lambda f: f.relative_to(p).as_posix())
    if any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise TinyLLMError(
                f"data.path={path} is a glob that matches no file. Check the pattern (use ** "
                "with a quoted path for sub-folders) or point data.path at a file or folder."
            )
        return files
    raise TinyLLMError(
        f"data.path={path} does not exist (looked for a file, a folder or a glob). Fix the path "
        "(relative paths are relative to the directory you run from), e.g. "
        "data.path=../shared/data/tinyshakespeare.txt."
    )


def _text(cfg: Mapping[str, Any]) -> Source:
    path = cfg_get(cfg, "path")
    if not path:
        raise TinyLLMError(
            "data=text needs data.path=FILE|FOLDER|GLOB (the text to train on), e.g. "
            "`python -m tinyllm.prepare data=text data.path=notes/ tokenizer.vocab_size=2048`."
        )
    exts = cfg_get(cfg, "extensions")
    files = resolve_text_paths(str(path), tuple(exts) if exts else None)
    base = Path(os.path.expanduser(str(path)))

    def units() -> Iterator[Unit]:
        for f in files:
            name = f.relative_to(base).as_posix() if base.is_dir() else str(f)
            yield Unit(name=name, path=f)

    name = cfg_get(cfg, "name", "text")
    return Source(name, "text", units, cfg_get(cfg, "separator"), info={"path": str(path)})


# --------------------------------------------------------------------------------------------
# Downloads: URL + sha256 + cache, resumable (HTTP Range), with a progress line

KNOWN_CORPORA: dict[str, dict[str, Any]] = {
    "shakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
        "input.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "filename": "tinyshakespeare.txt",
        "separator": None,
        "local_hint": "../shared/data/tinyshakespeare.txt",
    },
    "tinystories": {
        # The validation file (~19 MB, ~22k stories) suits CPU runs; point data.url at
        # TinyStories-train.txt (~1.9 GB) for the full set.
        "url": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
        "TinyStories-valid.txt",
        # Unknown offline when this was written, so not invented: the first download records
        # its sha256 next to the cached file (trust on first use) and later runs check it.
        "sha256": None,
        "filename": "TinyStories-valid.txt",
        "separator": "<|endoftext|>",
        "local_hint": "/path/to/TinyStories-valid.txt",
    },
}


def cache_dir() -> Path:
    """$TINYLLM_CACHE, else ~/.cache/tinyllm."""
    env = os.environ.get("TINYLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinyllm"


class Progress:
    """A one-line progress report on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int | None, label: str, unit: str = "MB", scale: float = 1e6):
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.tty = sys.stderr.isatty()

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        # a terminal gets 10 refreshes/s; a log file one line every 10 s
        if not force and now - self.last < (0.1 if self.tty else 10.0):
            return
        self.last = now
        rate = self.done / self.scale / max(now - self.t0, 1e-9)
        msg = f"{self.label}: {self.done / self.scale:,.1f}"
        if self.total:
            pct = 100.0 * self.done / self.total
            msg += f"/{self.total / self.scale:,.1f} {self.unit} ({pct:5.1f}%)"
        else:
            msg += f" {self.unit}"
        msg += f" {rate:,.2f} {self.unit}/s"
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr)

    def close(self) -> None:
        self.update(0, force=True)
        if self.tty:
            print(file=sys.stderr)


def _offline_fix(url: str, local_hint: str) -> str:
    return (
        f"Download it on a machine with internet access ({url}) and point data.path at the "
        f"local copy, e.g. data.path={local_hint}"
    )


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    local_hint: str = "/path/to/file",
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` once: resumable (HTTP Range on dest.part), sha256-checked.

    With `sha256=None` the hash is recorded beside the file on first download (dest.sha256)
    and checked on every later call, so a silently changed file is still caught.
    """
    dest = Path(dest)
    record = dest.with_name(dest.name + ".sha256")
    expected = sha256 or (record.read_text().strip() if record.is_file() else None)
    if dest.is_file():
        return _checked_cache(dest, expected, url, local_hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    resp = _open_url(url, have, timeout, local_hint)
    if resp is not None:  # (None: the .part file is already complete)
        _stream_into(resp, part, dest.name, have, url, local_hint, progress)
    got = sha256_file(part)
    if expected is not None and got != expected:
        part.unlink()
        raise TinyLLMError(
            f"The file downloaded from {url} has sha256 {got}, expected {expected} (the .part "
            "file was deleted). The server may have changed the file or the transfer was "
            "corrupted: run again, or " + _offline_fix(url, local_hint) + "."
        )
    os.replace(part, dest)
    if expected is None:
        write_text_atomic(record, got + "\n")
        warnings.warn(
            f"{url} has no published sha256 in tinyllm; recorded {got} in {record} (trust on "
            "first use) and later runs check against it.",
            stacklevel=2,
        )
    return dest


def _checked_cache(dest: Path, expected: str | None, url: str, local_hint: str) -> Path:
    """The cached file if its hash is the expected one; else move it aside and say so."""
    got = sha256_file(dest)
    if expected is None or got == expected:
        return dest
    bad = dest.with_name(dest.name + ".bad")
    os.replace(dest, bad)
    fix = _offline_fix(url, local_hint)
    raise TinyLLMError(
        f"The cached file {dest} has sha256 {got}, expected {expected}; it was moved to "
        f"{bad}. Run again to download a fresh copy, or {fix[0].lower()}{fix[1:]}."
    )


def _open_url(url: str, have: int, timeout: float, local_hint: str) -> Any:
    """The HTTP response from byte `have` on (Range), or None when nothing is left to fetch."""
    req = urllib.request.Request(url, headers={"User-Agent": "tinyllm"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part file is already complete
            return None
        raise TinyLLMError(
            f"Could not download {url} (HTTP {e.code} {e.reason}). "
            + _offline_fix(url, local_hint)
            + "."
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TinyLLMError(
            f"Could not download {url} ({reason}): this machine looks offline. "
            + _offline_fix(url, local_hint)
            + "."
        ) from None


def _stream_into(
    resp: Any, part: Path, name: str, have: int, url: str, local_hint: str, progress: bool
) -> None:
    """Append the response body to `part` (or start it over if the server ignored Range)."""
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = Progress(total, f"downloading {name}") if progress else None
        if bar:
            bar.update(have)
        try:
            with open(part, "ab" if have else "wb") as f:
                while block := resp.read(1 << 16):
                    f.write(block)
                    if bar:
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as e:
            raise TinyLLMError(
                f"The download of {url} broke off ({e}); {part} keeps what arrived and the "
                "next run resumes from there. " + _offline_fix(url, local_hint) + "."
            ) from None
        if bar:
            bar.close()


def _known(kind: str) -> Callable[[Mapping[str, Any]], Source]:
    def make(cfg: Mapping[str, Any]) -> Source:
        known = KNOWN_CORPORA.get(kind, {})
        url = cfg_get(cfg, "url", known.get("url"))
        sha = cfg_get(cfg, "sha256", known.get("sha256") if url == known.get("url") else None)
        sep = cfg.get("separator", known.get("separator")) if cfg else known.get("separator")
        hint = known.get("local_hint", "/path/to/file.txt")
        local = cfg_get(cfg, "path")
        name = cfg_get(cfg, "name", kind)
        info: dict[str, Any] = {"url": url, "sha256_expected": sha}
        if local:
            p = Path(os.path.expanduser(str(local)))
            if not p.is_file():
                raise TinyLLMError(
                    f"data.path={local} (a local copy of {kind}) is not a file. Fix the path, "
                    f"e.g. data.path={hint}, or leave data.path unset to download {url}."
                )
            info["path"] = str(p)

            checked: list[bool] = []  # the hash is checked once, not on every pass

            def units() -> Iterator[Unit]:
                if sha and not checked:
                    checked.append(True)
                    got = sha256_file(p)
                    if got != sha:
                        warnings.warn(
                            f"data.path={local} has sha256 {got}, not the published {sha} of "
                            f"{kind}: using it anyway (results will not match published ones).",
                            stacklevel=2,
                        )
                yield Unit(name=p.name, path=p)

            return Source(name, kind, units, sep, info)
        if not url:
            raise TinyLLMError(
                f"data={kind} needs data.url=URL (and ideally data.sha256=HEX) or "
                "data.path=FILE for a local copy."
            )
        filename = cfg_get(cfg, "filename", known.get("filename") or url.rsplit("/", 1)[-1])

        fetched: list[Path] = []  # download (and hash) once; later passes read the cache

        def units() -> Iterator[Unit]:
            if not fetched:
                fetched.append(download(url, cache_dir() / filename, sha, hint))
            yield Unit(name=filename, path=fetched[0])

        return Source(name, kind, units, sep, info)

    return make


def _qa(cfg: Mapping[str, Any]) -> Source:
    """A Q&A file as plain text documents (one rendered record each), for pretraining-style
    prepare; fine-tuning itself goes through tinyllm.data.qa.QADataModule."""
    from tinyllm.chat import ChatTemplate
    from tinyllm.data.qa_records import load_qa_records

    path = cfg_get(cfg, "path")
    if not path:
        raise TinyLLMError("data=qa needs data.path=FILE (a Q&A JSON array or JSON Lines file).")
    template = ChatTemplate.coerce(cfg_get(cfg, "template"))

    def units() -> Iterator[Unit]:
        for i, rec in enumerate(load_qa_records(path)):
            yield Unit(name=f"{path}#{i}", data=template.render_text(rec).encode("utf-8"))

    return Source(cfg_get(cfg, "name", "qa"), "qa", units, info={"path": str(path)})


SOURCES: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    "pydocs": _pydocs,
    "stdlib": _stdlib,
    "text": _text,
    "shakespeare": _known("shakespeare"),
    "tinystories": _known("tinystories"),
    "url": _known("url"),
    "qa": _qa,
}


def get_source(data_cfg: Mapping[str, Any]) -> Source:
    """Build the source named by data_cfg['source'] (or data_cfg['name'])."""
    kind = cfg_get(data_cfg, "source") or cfg_get(data_cfg, "name")
    if kind not in SOURCES:
        raise TinyLLMError(
            f"data.source={kind!r} is not a known source. Valid: {', '.join(SOURCES)} "
            "(pick one with data=<name>, or data=text data.path=... for your own files)."
        )
    return SOURCES[kind](data_cfg)


# --------------------------------------------------------------------------------------------
# Bad-file policy and the document stream


@dataclass
class ScanResult:
    """What one pass over the raw bytes found: content hash, sizes, bad units."""

    checksum: str = ""
    units: int = 0
    bytes: int = 0
    chars: int = 0
    documents: int = 0
    doc_chars: list[int] = field(default_factory=list)  # chars per document, in stream order
    empty: list[str] = field(default_factory=list)
    binary: list[str] = field(default_factory=list)
    bad_utf8: list[str] = field(default_factory=list)  # replaced (policy replace) or skipped
    skipped: set[str] = field(default_factory=set)
    file_sha256: str | None = None  # the sha256 of the file itself, for one-file corpora

    def report(self) -> dict[str, Any]:
        return {
            "checksum": self.checksum,
            "file_sha256": self.file_sha256,
            "units": self.units,
            "bytes": self.bytes,
            "documents": self.documents,
            "empty": len(self.empty),
            "binary": len(self.binary),
            "bad_utf8": len(self.bad_utf8),
            "skipped": len(self.skipped),
        }


def is_binary(head: bytes) -> bool:
    # NUL never occurs in text files; it is the classic (git, grep) binary sniff.
    return b"\x00" in head


def _decoded(unit: Unit, errors: str) -> Iterator[str]:
    dec = codecs.getincrementaldecoder("utf-8")(errors=errors)
    first = True
    for block in unit.blocks():
        if first and block.startswith(codecs.BOM_UTF8):
            block = block[3:]
        first = False
        yield dec.decode(block)
    yield dec.decode(b"", final=True)


def _split_stream(chunks: Iterator[str], sep: str | None) -> Iterator[tuple[str, bool]]:
    """Text chunks -> (piece, ends_document) with pieces cut on `sep` and at ~PIECE_BYTES.

    Long documents are cut only before a space that follows a non-space character and
    precedes a letter ("word| word"). No chunk of the GPT-2 or GPT-4 split pattern holds a
    non-space character followed by a space, so a chunk ends there in the whole text too; the
    chunk that starts there (" word") does not depend on what came before; and the one
    lookahead rule (`\\s+(?!\\S)`) only concerns whitespace runs, which cannot end at the cut.
    So encoding the pieces separately gives exactly the tokens of the whole document. (A cut
    after a newline would not be safe: GPT-2 splits "\\n\\nA" as "\\n", "\\n", "A" but a
    piece ending in "\\n\\n" as one chunk.)
    """
    buf = ""
    for chunk in chunks:
        buf += chunk
        if sep:
            *docs, buf = buf.split(sep)
            for d in docs:
                if d.strip():  # the newlines around a separator belong to neither document
                    yield from _cut(d.strip("\r\n"), final=True)
        pieces = list(_cut(buf, final=False))
        buf = pieces.pop()[0] if pieces else buf
        yield from pieces
    if sep is None:
        yield from _cut(buf, final=True)
    elif buf.strip():
        yield from _cut(buf.strip("\r\n"), final=True)


# A safe place to cut a long document: before a space that follows a non-space character and
# precedes a letter ("word| word"). See _split_stream for why.
_CUT = regex.compile(r"(?<=\S) (?=\p{L})")


def _cut(text: str, final: bool) -> Iterator[tuple[str, bool]]:
    # final=False: the last element is the unfinished rest (the caller keeps it as buffer)
    start = 0
    while len(text) - start > PIECE_BYTES:
        m = _CUT.search(text, start + PIECE_BYTES)
        if m is None or m.start() + 2 > len(text):  # the letter after it must be in view
            break
        yield text[start : m.start()], False
        start = m.start()
    yield text[start:], final


def scan(source: Source, bad_files: str = "replace") -> ScanResult:
    """One pass over the raw bytes: checksum, sizes, bad-file policy decisions."""
    if bad_files not in ("replace", "skip", "error"):
        raise TinyLLMError(
            f"data.bad_files={bad_files!r} is not a policy; use replace (decode invalid UTF-8 "
            "with U+FFFD), skip (leave such files out) or error (stop at the first one)."
        )
    res = ScanResult()
    h = hashlib.sha256()
    for unit in source.units():
        res.units += 1
        name_b = unit.name.encode("utf-8", "surrogateescape")
        h.update(len(name_b).to_bytes(8, "little") + name_b)
        n, uh, valid, head = _read_unit(unit)
        h.update(n.to_bytes(8, "little") + uh.digest())
        res.file_sha256 = uh.hexdigest() if res.units == 1 else None
        res.bytes += n
        where = f"{unit.path or unit.name}"
        if n == 0 or (n <= 3 and head == codecs.BOM_UTF8[:n]):
            res.empty.append(where)
            res.skipped.add(unit.name)
            continue
        if is_binary(head):
            if bad_files == "error":
                raise TinyLLMError(
                    f"{where} looks binary (it contains NUL bytes), not text. Remove it from "
                    "data.path, or set data.bad_files=skip to leave such files out."
                )
            res.binary.append(where)
            res.skipped.add(unit.name)
            continue
        if not valid:
            if bad_files == "error":
                raise TinyLLMError(
                    f"{where} is not valid UTF-8. Convert it (e.g. iconv -f latin1 -t utf-8), "
                    "or set data.bad_files=replace (decode with U+FFFD) or skip."
                )
            res.bad_utf8.append(where)
            if bad_files == "skip":
                res.skipped.add(unit.name)
                continue
        # chars per document: needed to split by document (fraction of text) or by position
        closed = True
        for piece, end in _split_stream(_decoded(unit, "replace"), source.separator):
            if closed:
                res.doc_chars.append(0)
            res.doc_chars[-1] += len(piece)
            res.chars += len(piece)
            closed = end
    res.documents = len(res.doc_chars)
    res.checksum = h.hexdigest()
    return res


def scan_bytes(blocks: Iterable[bytes], sha256: Any = None) -> tuple[int, bool, bytes]:
    """(bytes, valid UTF-8?, first 8 KB) of a byte stream in one pass, feeding `sha256` (a
    hashlib object) too when given. Shared by prepare's scan and the evaluator's text check."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    n, valid, head = 0, True, b""
    for block in blocks:
        if n == 0:
            head = block[:8192]
        n += len(block)
        if sha256 is not None:
            sha256.update(block)
        if valid:
            try:
                dec.decode(block)
            except UnicodeDecodeError:
                valid = False
    if valid:
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            valid = False
    return n, valid, head


def _read_unit(unit: Unit) -> tuple[int, Any, bool, bytes]:
    """(bytes, sha256 object, valid UTF-8?, first 8 KB) of one unit, in one streaming pass."""
    uh = hashlib.sha256()
    n, valid, head = scan_bytes(unit.blocks(), uh)
    return n, uh, valid, head


def iter_pieces(source: Source, result: ScanResult) -> Iterator[tuple[str, bool]]:
    """The document stream: (text piece, ends_document), skipping what the scan skipped."""
    for unit in source.units():
        if unit.name in result.skipped:
            continue
        yield from _split_stream(_decoded(unit, "replace"), source.separator)


def iter_documents(data_cfg: Mapping[str, Any]) -> Iterator[str]:
    """Whole documents as str (convenient for small corpora and tests; prepare streams)."""
    source = get_source(data_cfg)
    result = scan(source, cfg_get(data_cfg, "bad_files", "replace"))
    parts: list[str] = []
    for piece, end in iter_pieces(source, result):
        parts.append(piece)
        if end:
            yield "".join(parts)
            parts = []
