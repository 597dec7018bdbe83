"""prepare: text -> data/<name>-<vocab>/{tokenizer.json, train.bin, val.bin, meta.json}.

The steps, each streaming so a corpus larger than RAM works:

1. scan    one pass over the raw bytes: content hash (for reuse), sizes, bad-file policy.
2. split   decide which text is validation *before* encoding, by document (a seeded random
           set of whole documents) or, for one-document corpora, by position (the last
           val_fraction of the characters, as nanoGPT does for Tiny Shakespeare).
3. tokenizer  train BPE on (a sample of) the training text, or load tokenizer.path.
4. encode  pieces of ~256 KB go to a process pool; results come back in order and are
           appended to train/val bins under temporary names, an EOS between documents.
5. commit  rename the bins, write tokenizer.json, and write meta.json last: a folder without
           meta.json is incomplete, whatever else it holds.

The bins are flat arrays of token ids (uint16 when the vocab fits, else uint32), read back with
np.memmap by TokenBinDataModule.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm.data.sources import (
    PIECE_BYTES,
    Progress,
    ScanResult,
    Source,
    cfg_get,
    get_source,
    iter_pieces,
    scan,
    sha256_file,
)
from tinyllm.errors import TinyLLMError
from tinyllm.io import remove_stale_temporaries, write_text_atomic

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_KEYS = (
    "format_version",
    "dtype",
    "vocab_size",
    "tokenizer_sha256",
    "splits",
    "source",
    "config_hash",
    "created_by",
)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TRAIN_CHARS = 20_000_000  # tokenizer training sample cap (BPE training is the slow part)


def _plain(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A Hydra DictConfig or a dict -> a plain dict (JSON-able)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return json.loads(json.dumps(dict(cfg), default=str))


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab <= 65536: half the disk and page cache), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def default_data_dir(
    data_cfg: Mapping[str, Any], tokenizer_cfg: Mapping[str, Any], data_root: str | Path = "data"
) -> Path:
    """data/<name>-<vocab_size>-<hash>, or data/<name>-<tokenizer file stem>-<hash>.

    The hash (8 hex digits) covers every setting that decides the folder's contents: where the
    text comes from (an absolute path, a URL) and how it is split and tokenized. Two corpora,
    or one corpus with two split settings, never share a folder: a prepare of one can no
    longer rewrite the bins another run is training on (`data=text` used to put every text
    into data/text-<vocab>/).
    """
    name = cfg_get(data_cfg, "name") or cfg_get(data_cfg, "source", "data")
    tpath = cfg_get(tokenizer_cfg, "path")
    suffix = Path(str(tpath)).stem if tpath else str(cfg_get(tokenizer_cfg, "vocab_size", 4096))
    canon = json.dumps(_settings(data_cfg, tokenizer_cfg), sort_keys=True, default=str)
    short = hashlib.sha256(canon.encode()).hexdigest()[:8]
    return Path(data_root) / f"{name}-{suffix}-{short}"


def _settings(data_cfg: Mapping[str, Any], tokenizer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a prepared folder is made from (paths made absolute)."""
    data, tok = _plain(data_cfg), _plain(tokenizer_cfg)
    defaults = {"val_fraction": DEFAULT_VAL_FRACTION, "split": "auto", "split_seed": 1337,
                "bad_files": "replace", "vocab_size": 4096, "pattern": "gpt4",
                "train_chars": DEFAULT_TRAIN_CHARS}  # fmt: skip
    keys = ("source", "path", "url", "extensions", "separator", "bad_files", "split",
            "val_fraction", "val_tokens", "split_seed", "template")  # fmt: skip
    out = {k: cfg_get(data, k, defaults.get(k)) for k in keys}
    out["tokenizer"] = {k: cfg_get(tok, k, defaults.get(k)) for k in ("vocab_size", "pattern",
                        "special_tokens", "train_chars", "path")}  # fmt: skip
    for d in (out, out["tokenizer"]):
        if d.get("path"):
            d["path"] = os.path.abspath(os.path.expanduser(str(d["path"])))
    return out


# --------------------------------------------------------------------------------------------
# meta.json


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read and validate data_dir/meta.json against the bins beside it (TinyLLMError if bad)."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    fix = f"Run `python -m tinyllm.prepare ... out_dir={data_dir} force=true` to rebuild it."
    if not path.is_file():
        what = "is not a folder" if not data_dir.is_dir() else "has no meta.json"
        raise TinyLLMError(
            f"Data folder {data_dir} {what} (a prepared folder holds tokenizer.json, train.bin, "
            f"val.bin and meta.json, which is written last; without it the folder is missing "
            f"or incomplete). {fix}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLLMError(f"{path} is not valid JSON ({e}). {fix}") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise TinyLLMError(f"{path} lacks the keys {missing}: not a tinyllm data folder. {fix}")
    if not isinstance(meta["splits"], dict):
        raise TinyLLMError(f"{path} has a malformed 'splits' entry. {fix}")
    if meta["format_version"] != FORMAT_VERSION:
        raise TinyLLMError(
            f"{path} has format_version {meta['format_version']!r}; this tinyllm reads "
            f"{FORMAT_VERSION}. {fix}"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise TinyLLMError(f"{path} has dtype {meta['dtype']!r}, not uint16/uint32. {fix}")
    top = meta.get("max_token_id")  # (absent in folders prepared before it was recorded)
    if top is not None and not (isinstance(top, int) and top < int(meta["vocab_size"])):
        raise TinyLLMError(
            f"{path} records token ids up to {top}, but the vocabulary has "
            f"{meta['vocab_size']} ids (0..{int(meta['vocab_size']) - 1}): the bins were "
            f"written with another tokenizer, or meta.json was edited. {fix}"
        )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        bin_path = data_dir / f"{split}.bin"
        info = meta["splits"].get(split)
        if info is None or not bin_path.is_file():
            raise TinyLLMError(f"{data_dir} has no {split}.bin (or meta lacks it). {fix}")
        size = bin_path.stat().st_size
        if size % itemsize:
            raise TinyLLMError(
                f"{bin_path} is {size} bytes, not a multiple of {itemsize} ({meta['dtype']}): "
                f"the file is truncated or from elsewhere. {fix}"
            )
        if size // itemsize != info["tokens"]:
            raise TinyLLMError(
                f"{bin_path} holds {size // itemsize} tokens but meta.json says "
                f"{info['tokens']}: the bin and meta.json do not belong together. {fix}"
            )
    return meta


# --------------------------------------------------------------------------------------------
# the split plan


def no_text_message(res: ScanResult, bad_files: str) -> str:
    """Why a corpus came out empty, and the fix that applies (not the setting already in use)."""
    counts = (
        f"{len(res.empty)} empty, {len(res.binary)} binary, {len(res.bad_utf8)} non-UTF-8 "
        f"file(s) under data.bad_files={bad_files}"
    )
    if res.bad_utf8 and bad_files != "replace":
        fix = "data.bad_files=replace reads the non-UTF-8 files (invalid bytes become U+FFFD)"
    else:  # empty and binary files are skipped whatever the policy
        fix = (
            "point data.path at UTF-8 text files (a file, a folder or a glob; folders are read "
            "by data.extensions)"
        )
    return f"The corpus holds no text ({counts}). Fix: {fix}."


def _plan_split(
    data_cfg: Mapping[str, Any], res: ScanResult, chars_per_token: float | None
) -> dict[str, Any]:
    """-> {"method", "val_docs" (document) | "cut" (position), "val_chars"}."""
    method = cfg_get(data_cfg, "split", "auto")
    if method not in ("auto", "document", "position"):
        raise TinyLLMError(
            f"data.split={method!r} is not a split method; use auto (position for one "
            "document, else document), document or position."
        )
    if res.documents == 0 or res.chars == 0:
        raise TinyLLMError(no_text_message(res, cfg_get(data_cfg, "bad_files", "replace")))
    val_tokens = cfg_get(data_cfg, "val_tokens")
    val_fraction = cfg_get(data_cfg, "val_fraction", DEFAULT_VAL_FRACTION)
    if val_tokens is not None:
        val_chars = int(round(float(val_tokens) * (chars_per_token or 4.0)))
    else:
        if not 0.0 < float(val_fraction) < 1.0:
            raise TinyLLMError(
                f"data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.1; or set "
                "data.val_tokens=N for a fixed validation size."
            )
        val_chars = int(res.chars * float(val_fraction))
    if method == "auto":
        method = "position" if res.documents == 1 else "document"
    plan: dict[str, Any] = {"method": method, "val_chars": val_chars}
    if method == "position":
        # nanoGPT's split: train = text[: int(n * 0.9)], val = the rest
        plan["cut"] = (
            res.chars - val_chars
            if val_tokens is not None
            else int(res.chars * (1.0 - float(val_fraction)))
        )
        plan["val_chars"] = res.chars - plan["cut"]
        if not 0 < plan["cut"] < res.chars:
            raise TinyLLMError(
                f"The validation split ({val_chars} of {res.chars} characters) leaves no text "
                "for training or none for validation; lower data.val_tokens/val_fraction."
            )
        return plan
    if res.documents < 2:
        raise TinyLLMError(
            "data.split=document needs at least 2 documents, this corpus has 1; use "
            "data.split=position (the last val_fraction of the text) or a data.separator."
        )
    plan.update(
        _pick_val_docs(res.doc_chars, val_chars, int(cfg_get(data_cfg, "split_seed", 1337)))
    )
    return plan


VAL_SHARE_TOLERANCE = 0.25  # whole documents may miss the asked validation size by this much


def _pick_val_docs(doc_chars: list[int], val_chars: int, seed: int) -> dict[str, Any]:
    """A seeded random set of whole documents holding ~val_chars characters.

    Whole documents keep validation free of any text the model trained on. With a few large
    documents that can miss badly (3 files, val_fraction=0.1: one file, 51% of the text, went
    to validation), so when whole documents land further than VAL_SHARE_TOLERANCE from the
    asked size, validation takes the documents that fit plus the *tail* of one more document
    (cut by position, as for a single document), and the plan says so (`note`).
    """
    order = np.random.default_rng(seed).permutation(len(doc_chars))
    val_docs, total = set(), 0
    for i in order[:-1]:  # never all documents: training keeps at least one
        if total >= val_chars:
            break
        val_docs.add(int(i))
        total += doc_chars[int(i)]
    if abs(total - val_chars) <= VAL_SHARE_TOLERANCE * val_chars:
        return {"val_docs": val_docs, "val_chars": total}
    val_docs, total = set(), 0
    for i in order:  # the documents that fit whole ...
        if total + doc_chars[int(i)] <= val_chars and len(val_docs) < len(doc_chars) - 1:
            val_docs.add(int(i))
            total += doc_chars[int(i)]
    # ... and the tail of the largest remaining one (its head stays in training)
    rest = [int(i) for i in order if int(i) not in val_docs]
    cut_doc = max(rest, key=lambda i: doc_chars[i])
    take = min(val_chars - total, doc_chars[cut_doc] - 1)
    note = (
        f"whole documents could not hold a validation share near the one asked "
        f"({len(doc_chars)} documents); validation = {len(val_docs)} whole document(s) + the "
        f"last {take:,} characters of document #{cut_doc} (its first "
        f"{doc_chars[cut_doc] - take:,} stay in training)"
    )
    return {
        "val_docs": val_docs,
        "cut_doc": cut_doc,
        "doc_cut": doc_chars[cut_doc] - take,
        "val_chars": total + take,
        "note": note,
    }


def _assign(
    pieces: Iterator[tuple[str, bool]], plan: dict[str, Any]
) -> Iterator[tuple[int, str, bool]]:
    """(piece, ends_doc) -> (split index, text, starts_document_in_this_split)."""
    doc, pos, doc_pos, starting = 0, 0, 0, True
    cut = plan.get("cut")
    val_docs = plan.get("val_docs", set())
    cut_doc, doc_cut = plan.get("cut_doc"), plan.get("doc_cut")
    for text, end in pieces:
        if cut is not None:
            yield from _cut_piece(text, pos, cut, starting)
        elif doc == cut_doc:  # the tail of this document goes to validation
            yield from _cut_piece(text, doc_pos, doc_cut, starting)
        else:
            yield (1 if doc in val_docs else 0), text, starting
        pos += len(text)
        doc_pos = 0 if end else doc_pos + len(text)
        starting = end
        doc += int(end)


def _cut_piece(text: str, pos: int, cut: int, starting: bool) -> Iterator[tuple[int, str, bool]]:
    """A piece at `pos` of a text whose characters from `cut` on are validation."""
    if pos < cut < pos + len(text):  # the cut falls inside this piece
        k = cut - pos
        yield 0, text[:k], starting
        yield 1, text[k:], True
    else:
        yield (0 if pos < cut else 1), text, starting or pos == cut


# --------------------------------------------------------------------------------------------
# encoding workers

_TOK: Any = None
_DTYPE: Any = None


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the prepare process dies. A kill -9 of
    prepare otherwise orphaned its encoding workers (still encoding a minute later, ~80 MB
    each); a signal the parent can't catch can't be relayed by it, hence the kernel."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _start_worker(parent_pid: int, tok_dict: dict[str, Any], dtype: str) -> None:
    _die_with_parent(parent_pid)
    _init_worker(tok_dict, dtype)


def _init_worker(tok_dict: dict[str, Any], dtype: str) -> None:
    global _TOK, _DTYPE
    from tinyllm.tokenizer import BPETokenizer

    _TOK, _DTYPE = BPETokenizer.from_dict(tok_dict), np.dtype(dtype)


def _encode_task(task: list[tuple[int, str, bool]]) -> list[tuple[int, bytes, int, bool, int]]:
    """Encode a batch of pieces -> (split, token bytes, UTF-8 bytes, starts_document, max id)."""
    out = []
    for split, text, start in task:
        ids = np.asarray(_TOK.encode(text), dtype=_DTYPE)
        top = int(ids.max()) if len(ids) else -1
        out.append((split, ids.tobytes(), len(text.encode("utf-8")), start, top))
    return out


def _tasks(items: Iterator[tuple[int, str, bool]]) -> Iterator[list[tuple[int, str, bool]]]:
    """Group small pieces (short documents) into tasks of ~PIECE_BYTES characters."""
    task, size = [], 0
    for item in items:
        if not item[1]:
            continue
        task.append(item)
        size += len(item[1])
        if size >= PIECE_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task


def _run_tasks(
    tasks: Iterator[list[tuple[int, str, bool]]], workers: int, tok_dict: dict, dtype: str
) -> Iterator[list[tuple[int, bytes, int, bool, int]]]:
    """Results in task order; at most 4 tasks per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tok_dict, dtype)
        for task in tasks:
            yield _encode_task(task)
        return
    ctx = get_context("fork" if sys.platform == "linux" else "spawn")
    init_args = (os.getpid(), tok_dict, dtype)
    with ProcessPoolExecutor(workers, ctx, _start_worker, init_args) as pool:
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(pool.submit(_encode_task, task))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------------------------
# the tokenizer


def open_tokenizer(path: str, tokenizer_cfg: Mapping[str, Any]) -> Any:
    """tokenizer.path: any tokenizer file load_tokenizer reads (tinyllm JSON, HF, .tiktoken)."""
    from tinyllm.tokenizer import load_tokenizer

    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise TinyLLMError(
            f"tokenizer.path={path} is not a file. Point it at a tokenizer.json written by "
            "tinyllm (or a .tiktoken ranks file), or leave it null to train a tokenizer."
        )
    specials = _plain(cfg_get(tokenizer_cfg, "special_tokens")) or None
    pattern = cfg_get(tokenizer_cfg, "pattern", "gpt2")
    return load_tokenizer(p, pattern=pattern, special_tokens=specials)


def _train_tokenizer(
    source: Source, res: ScanResult, tokenizer_cfg: Mapping[str, Any], plan: dict | None
) -> Any:
    """BPE on the training text (or, with plan=None, all text), capped at train_chars."""
    cap = int(cfg_get(tokenizer_cfg, "train_chars", DEFAULT_TRAIN_CHARS))
    train_chars = res.chars - (plan["val_chars"] if plan else 0)
    # take every k-th document so a capped sample still spans the whole corpus
    every = max(1, int(np.ceil(train_chars / cap))) if cap > 0 else 1

    def sample() -> Iterator[str]:
        taken, parts = 0, []
        items = (
            _assign(iter_pieces(source, res), plan)
            if plan
            else ((0, t, s) for t, s in _starts(iter_pieces(source, res)))
        )
        doc = -1
        for split, text, start in items:
            if start and split == 0:
                doc += 1
                if parts:
                    yield "".join(parts)
                    parts = []
            if split != 0 or doc % every:
                continue
            parts.append(text)
            taken += len(text)
            if taken >= cap > 0:
                break
        if parts:
            yield "".join(parts)

    return train_tokenizer(sample(), tokenizer_cfg)


def train_tokenizer(texts: Iterable[str], tokenizer_cfg: Mapping[str, Any]) -> Any:
    """BPE by the `tokenizer` group's settings (vocab_size, pattern, special_tokens): the one
    tokenizer-training path, for corpora (above) and Q&A files (data/qa.py) alike."""
    from tinyllm.tokenizer import BPETokenizer

    vocab_size = int(cfg_get(tokenizer_cfg, "vocab_size", 4096))
    pattern = cfg_get(tokenizer_cfg, "pattern", "gpt4")
    specials = cfg_get(tokenizer_cfg, "special_tokens")
    specials = list(specials) if specials is not None else None
    t0 = time.perf_counter()
    print(f"training a BPE tokenizer: vocab_size={vocab_size} pattern={pattern}", file=sys.stderr)
    tok = BPETokenizer.train(texts, vocab_size, pattern=pattern, special_tokens=specials)
    print(f"  done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return tok


def tokenizer_meta(tok: Any) -> dict[str, Any]:
    """The head of every meta (meta.json, and the Q&A data's): format, ids, tokenizer hash."""
    return {
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(tok.vocab_size),
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256(),
        "eos_id": tok.eos_id,
    }


def _starts(pieces: Iterator[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """(piece, ends_doc) -> (piece, starts_doc)."""
    start = True
    for text, end in pieces:
        yield text, start
        start = end


# --------------------------------------------------------------------------------------------
# prepare_data


def _created_by() -> str:
    argv0 = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    if argv0 in ("prepare", "train") or argv0.startswith("tinyllm"):
        return " ".join([f"python -m tinyllm.{argv0}", *sys.argv[1:]])
    return "tinyllm.data.prepare.prepare_data (Python API)"


def _config_hash(
    data_cfg: Mapping[str, Any], tokenizer_cfg: Mapping[str, Any], checksum: str, tok_sha: str
) -> str:
    keys = ("source", "separator", "bad_files", "split", "val_fraction", "val_tokens")
    key = {
        "format_version": FORMAT_VERSION,
        "source_checksum": checksum,
        "data": {k: _plain(data_cfg).get(k) for k in (*keys, "split_seed", "url", "template")},
        "tokenizer": {
            k: _plain(tokenizer_cfg).get(k)
            for k in ("vocab_size", "pattern", "special_tokens", "train_chars")
        },
        "tokenizer_file_sha256": tok_sha,
    }
    canon = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def _existing_meta(out_dir: Path) -> dict[str, Any] | None:
    try:
        return read_meta(out_dir)
    except TinyLLMError:
        return None


def prepare_data(
    data_cfg: Mapping[str, Any],
    tokenizer_cfg: Mapping[str, Any],
    out_dir: str | Path,
    force: bool = False,
    num_workers: int | None = None,
) -> Path:
    """Tokenize a corpus into out_dir/{tokenizer.json, train.bin, val.bin, meta.json}.

    Reuses out_dir when its meta.json has the same content hash (source bytes + settings);
    `force=True` redoes it. Returns out_dir. Concurrent calls on one folder (several jobs or
    nodes) take turns on a lock file beside it (.<name>.lock): the later ones reuse the folder.
    """
    from tinyllm.launch import folder_lock

    with folder_lock(out_dir, "preparing"):
        return _prepare_unlocked(data_cfg, tokenizer_cfg, Path(out_dir), force, num_workers)


def _prepare_unlocked(
    data_cfg: Mapping[str, Any],
    tokenizer_cfg: Mapping[str, Any],
    out_dir: Path,
    force: bool,
    num_workers: int | None,
) -> Path:
    # (under the folder's lock: the temporaries found now are a killed prepare's, never a
    # concurrent prepare's live ones)
    for p in remove_stale_temporaries(out_dir):
        print(f"removed {p.name}, left by a prepare that was killed", file=sys.stderr)
    source = get_source(data_cfg)
    bad_files = cfg_get(data_cfg, "bad_files", "replace")
    res = scan(source, bad_files)
    _note_bad_files(res, bad_files)
    tpath = cfg_get(tokenizer_cfg, "path")
    tok_file_sha = (
        sha256_file(os.path.expanduser(str(tpath)))
        if tpath and Path(os.path.expanduser(str(tpath))).is_file()
        else ""
    )
    config_hash = _config_hash(data_cfg, tokenizer_cfg, res.checksum, tok_file_sha)
    old = _existing_meta(out_dir)
    if old is not None and old["config_hash"] == config_hash and not force:
        print(f"reusing {out_dir} (same content hash; force=true redoes it)", file=sys.stderr)
        return out_dir

    # the tokenizer, and the split (which, for val_tokens, needs the tokenizer's chars/token)
    val_tokens = cfg_get(data_cfg, "val_tokens")
    plan = None if val_tokens is not None else _plan_split(data_cfg, res, None)
    tok = open_tokenizer(str(tpath), tokenizer_cfg) if tpath else None
    if tok is None:
        tok = _train_tokenizer(source, res, tokenizer_cfg, plan)
    if plan is None:
        plan = _plan_split(data_cfg, res, _chars_per_token(tok, source, res))
    if plan.get("note"):
        print(f"split: {plan['note']}", file=sys.stderr)
    workers = int(num_workers) if num_workers else (len(os.sched_getaffinity(0)) or 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json goes first, so a crash from here on leaves a folder that reads as incomplete
    (out_dir / "meta.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    stats, max_id = _write_bins(out_dir, source, res, plan, tok, workers)
    tok.save(out_dir / "tokenizer.json")
    elapsed = time.perf_counter() - t0
    meta = {
        **tokenizer_meta(tok),
        "splits": stats,
        "max_token_id": max_id,
        **_provenance(data_cfg, source, res, plan, bad_files),
        "config_hash": config_hash,
        "created_by": _created_by(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encode_seconds": round(elapsed, 3),
        "num_workers": workers,
    }
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    tr, va = stats["train"], stats["val"]
    print(
        f"wrote {out_dir}: train {tr['tokens']:,} tokens ({tr['documents']} docs), val "
        f"{va['tokens']:,} tokens ({va['documents']} docs), {token_dtype(tok.vocab_size)}, "
        f"vocab {tok.vocab_size}, "
        f"{res.bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s",
        file=sys.stderr,
    )
    return out_dir


def _provenance(
    data_cfg: Mapping[str, Any], source: Source, res: ScanResult, plan: dict, bad_files: str
) -> dict[str, Any]:
    """meta.json's record of how the split was made and where the text came from."""
    val_tokens = cfg_get(data_cfg, "val_tokens")
    return {
        "split": {
            "method": plan["method"],
            "val_fraction": None
            if val_tokens is not None
            else cfg_get(data_cfg, "val_fraction", DEFAULT_VAL_FRACTION),
            "val_tokens_requested": val_tokens,
            "note": plan.get("note"),
        },
        "source": {
            "name": cfg_get(data_cfg, "name", source.name),
            "kind": source.kind,
            **source.info,
            **res.report(),
            "bad_files_policy": bad_files,
        },
    }


def _note_bad_files(res: ScanResult, bad_files: str) -> None:
    if res.empty or res.binary or res.bad_utf8:
        action = "replaced invalid bytes in" if bad_files == "replace" else "skipped"
        print(
            f"bad files: {len(res.empty)} empty and {len(res.binary)} binary skipped, "
            f"{len(res.bad_utf8)} not UTF-8 ({action} those; data.bad_files=replace|skip|error)",
            file=sys.stderr,
        )


def _write_bins(
    out_dir: Path, source: Source, res: ScanResult, plan: dict, tok: Any, workers: int
) -> tuple[dict[str, dict[str, int]], int]:
    """Encode in parallel into temporary bins, renamed into place once both are whole;
    returns tokens, bytes and documents per split, and the largest id written."""
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_id
    if eos is None:
        warnings.warn(
            "the tokenizer has no EOS token: documents are concatenated without a separator.",
            stacklevel=3,
        )
    tmp = {s: out_dir / f".{s}.bin.tmp-{os.getpid()}" for s in SPLITS}
    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    eos_bytes = np.asarray([eos if eos is not None else 0], dtype=dtype).tobytes()
    max_id = -1  # the largest id written: checked against the vocabulary on every load
    try:
        files = {s: open(tmp[s], "wb") for s in SPLITS}  # noqa: SIM115 (closed below)
        try:
            bar = Progress(res.bytes, f"encoding with {workers} worker(s)")
            items = _assign(iter_pieces(source, res), plan)
            for results in _run_tasks(_tasks(items), workers, tok.to_dict(), dtype):
                for split, ids, nbytes, start, top in results:
                    st, f = stats[SPLITS[split]], files[SPLITS[split]]
                    max_id = max(max_id, top)
                    if start:
                        if st["documents"] and eos is not None:  # EOS *between* documents
                            f.write(eos_bytes)
                            st["tokens"] += 1
                            max_id = max(max_id, eos)
                        st["documents"] += 1
                    f.write(ids)
                    st["tokens"] += len(ids) // np.dtype(dtype).itemsize
                    st["bytes"] += nbytes
                    bar.update(nbytes)
            bar.close()
        finally:
            for f in files.values():
                f.close()
        for s in SPLITS:
            if stats[s]["tokens"] == 0:
                raise TinyLLMError(
                    f"The {s} split came out empty ({res.chars} characters in "
                    f"{res.documents} documents). Use a larger corpus or adjust "
                    "data.val_fraction / data.val_tokens."
                )
        for s in SPLITS:
            os.replace(tmp[s], out_dir / f"{s}.bin")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return stats, max_id


def _chars_per_token(tok: Any, source: Source, res: ScanResult, sample: int = 1 << 20) -> float:
    """Measured on the first ~1M characters: converts data.val_tokens into text to hold out."""
    chars, tokens = 0, 0
    for text, _ in iter_pieces(source, res):
        chars += len(text)
        tokens += len(tok.encode(text))
        if chars >= sample:
            break
    return chars / max(tokens, 1)
