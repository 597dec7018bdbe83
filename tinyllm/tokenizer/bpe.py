"""Byte-level BPE tokenizer: the 256 byte values are the base tokens, merges are learned on top.

    tok = BPETokenizer.train(text, vocab_size=8192, pattern="gpt4")
    ids = tok.encode("Hello world")          # list[int]
    assert tok.decode(ids) == "Hello world"

Encoding one piece of text:
1. Special tokens the caller allows (`allowed_special`) are cut out first and map to their ids;
   everywhere else text that merely looks like a special token is ordinary text.
2. The split regex cuts the text into chunks (words, numbers, punctuation, whitespace runs).
3. Each chunk's UTF-8 bytes start as byte tokens; the adjacent pair with the lowest merge rank
   is merged (all its occurrences, left to right) until no pair has a merge. Chunks repeat a
   lot, so results are cached per chunk.
Decoding joins the tokens' bytes and decodes UTF-8, so decode(encode(s)) == s exactly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import operator
import os
import warnings
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import regex

from tinyllm.errors import TinyLLMError
from tinyllm.io import write_text_atomic
from tinyllm.tokenizer import train as _train
from tinyllm.tokenizer.patterns import pattern_name, resolve_pattern, splitter
from tinyllm.tokenizer.train import _merge_word, count_chunks, learn_merges, text_to_bytes

FORMAT_NAME = "tinyllm.bpe"
FORMAT_VERSION = 1
DEFAULT_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
ROLES = ("bos", "eos", "pad")
CACHE_SIZE = 1 << 18  # chunks remembered by encode (cleared when full)
_INF = float("inf")


def guess_roles(names: Iterable[str]) -> dict[str, str | None]:
    """bos/eos/pad from special-token names: '<|bos|>' -> bos ...; GPT-2's '<|endoftext|>'
    is both bos and eos (documents are separated by it)."""
    roles: dict[str, str | None] = dict.fromkeys(ROLES)
    aliases = {
        "bos": ("bos", "<s>", "begin_of_text"),
        "eos": ("eos", "</s>", "end_of_text"),
        "pad": ("pad",),
    }
    for name in names:
        low = name.lower()
        for role, keys in aliases.items():
            if roles[role] is None and any(k in low for k in keys):
                roles[role] = name
    for name in names:
        if name == "<|endoftext|>":
            roles["bos"] = roles["bos"] or name
            roles["eos"] = roles["eos"] or name
    return roles


class BPETokenizer:
    """A byte-level BPE vocabulary: split pattern + byte ids + ordered merges + special tokens.

    Ids are dense: every id in [0, vocab_size) is a byte, a merge result or a special token.
    Trained tokenizers use byte b -> id b and merge i -> id 256 + i, then the specials; imported
    ones (tiktoken, Hugging Face) may number bytes differently, hence `byte_ids`.
    """

    def __init__(
        self,
        merges: Sequence[Sequence[int]],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
        byte_ids: Sequence[int] | None = None,
        roles: dict[str, str | None] | None = None,
    ) -> None:
        self.pattern = resolve_pattern(pattern)
        self._split = splitter(self.pattern)  # (time-limited for a custom regex)
        self.byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        # merges in priority order: (left id, right id, new id); trained: new id = 256 + rank
        self.merges = [(_id(a), _id(b), _id(n)) for a, b, n in merges]
        self.special_tokens = dict(special_tokens or {})
        self.roles = guess_roles(self.special_tokens) if roles is None else dict(roles)
        self._build()

    # ---------------------------------------------------------------- construction helpers
    def _build(self) -> None:
        """Check the ids and derive the lookup tables."""
        if len(self.byte_ids) != 256:
            raise TinyLLMError(f"tokenizer byte_ids must list 256 ids, got {len(self.byte_ids)}.")
        # A token is usually made by one merge; HF files converted from tiktoken list every
        # split of a token (same new id, same bytes), which is allowed.
        n = 256 + len({m[2] for m in self.merges}) + len(self.special_tokens)
        vocab: list[bytes | None] = [None] * n
        owner: dict[int, str] = {}

        def claim(i: int, what: str) -> None:
            if not 0 <= i < n:
                raise TinyLLMError(
                    f"tokenizer id {i} ({what}) is outside [0, {n}): ids must be dense "
                    f"(bytes, merges and special tokens numbered 0..{n - 1})."
                )
            if i in owner:
                raise TinyLLMError(
                    f"tokenizer id clash: id {i} is used by both {owner[i]} and {what}; "
                    f"give every byte, merge and special token its own id."
                )
            owner[i] = what

        for b, i in enumerate(self.byte_ids):
            claim(i, f"byte {b}")
            vocab[i] = bytes([b])
        _resolve_merges(self.merges, vocab, owner, claim)
        ranks: dict[tuple[int, int], int] = {}
        new_ids: dict[tuple[int, int], int] = {}
        for rank, (a, b, new) in enumerate(self.merges):
            ranks.setdefault((a, b), rank)
            new_ids.setdefault((a, b), new)
        for name, i in self.special_tokens.items():
            if not isinstance(name, str) or not name:
                raise TinyLLMError(f"special token names must be non-empty strings, got {name!r}")
            claim(int(i), f"special token {name!r}")
            vocab[int(i)] = name.encode("utf-8")
        for role, name in self.roles.items():
            if role not in ROLES:
                raise TinyLLMError(f"unknown special-token role {role!r}; valid roles: {ROLES}")
            if name is not None and name not in self.special_tokens:
                raise TinyLLMError(
                    f"special-token role {role}={name!r} names no special token; "
                    f"defined: {sorted(self.special_tokens)}"
                )
        self.roles = {r: self.roles.get(r) for r in ROLES}
        self._vocab: list[bytes] = vocab  # type: ignore[assignment]
        self._ranks = ranks
        self._new_ids = new_ids
        self._cache: dict[str, list[int]] = {}
        self._special_re: dict[frozenset[str], Any] = {}
        self._c = None
        if _train._fastbpe is not None:  # C fast path for chunks (same results as `_bpe`)
            self._c = _train._fastbpe.Encoder(self.byte_ids, [m for m in self.merges])

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return len(self._vocab)

    def _role_id(self, role: str) -> int | None:
        name = self.roles.get(role)
        return None if name is None else self.special_tokens[name]

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    def token_bytes(self, id: int) -> bytes:
        """The bytes a token stands for (a special token: its name in UTF-8)."""
        if not 0 <= int(id) < len(self._vocab):
            raise TinyLLMError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self._vocab[int(id)]

    def __repr__(self) -> str:
        name = pattern_name(self.pattern) or "custom"
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"pattern={name!r}, special_tokens={self.special_tokens})"
        )

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        text_or_iterable: str | os.PathLike | Iterable[str | os.PathLike],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] | None = None,
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn merges from a corpus: a str, a Path (streamed), or an iterable of documents
        (str) / Paths. `vocab_size` counts the special tokens, which get the ids right after
        the merges (default: <|bos|>, <|eos|>, <|pad|>)."""
        names = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
        if isinstance(special_tokens, dict):
            names = sorted(special_tokens, key=special_tokens.get)
        if len(set(names)) != len(names):
            raise TinyLLMError(f"special tokens must be distinct, got {names}")
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or (vocab_size < 256 + len(names))
        ):
            raise TinyLLMError(
                f"tokenizer vocab_size={vocab_size!r} is too small: it must be an int of at "
                f"least 256 (byte tokens) + {len(names)} (special tokens) = {256 + len(names)}; "
                "raise tokenizer.vocab_size."
            )
        if (
            isinstance(text_or_iterable, (bytes, bytearray))
            or text_or_iterable is None
            or not (isinstance(text_or_iterable, (str, os.PathLike, Iterable)))
        ):
            raise TinyLLMError(
                f"BPETokenizer.train needs a str, a Path, or an iterable of str/Path; got "
                f"{type(text_or_iterable).__name__}. Decode bytes to str first."
            )
        pattern_src = resolve_pattern(pattern)
        counts = count_chunks(text_or_iterable, pattern_src, verbose=verbose)
        if not counts:
            raise TinyLLMError(
                "tokenizer training corpus is empty (no text after reading the input); "
                "check the data path or pass some text."
            )
        num_merges = vocab_size - 256 - len(names)
        pairs = learn_merges(counts, num_merges, verbose=verbose)
        if len(pairs) < num_merges:
            warnings.warn(
                f"the corpus only supports {len(pairs)} merges, fewer than the {num_merges} "
                f"asked for; vocab_size is {256 + len(pairs) + len(names)} instead of "
                f"{vocab_size}.",
                stacklevel=2,
            )
        merges = [(a, b, 256 + i) for i, (a, b) in enumerate(pairs)]
        specials = {name: 256 + len(merges) + j for j, name in enumerate(names)}
        return cls(merges, pattern=pattern_src, special_tokens=specials)

    # ---------------------------------------------------------------- encoding
    def _bpe(self, b: bytes) -> list[int]:
        """Merge one chunk's byte tokens by rank until no adjacent pair has a merge."""
        ids = [self.byte_ids[x] for x in b]
        ranks = self._ranks
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, _INF))
            if pair not in ranks:
                break
            ids = _merge_word(ids, pair[0], pair[1], self._new_ids[pair])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        chunks = self._split(text)
        if self._c is not None:
            return self._c.encode_chunks(chunks)
        out: list[int] = []
        cache = self._cache
        for chunk in chunks:
            ids = cache.get(chunk)
            if ids is None:
                ids = self._bpe(text_to_bytes(chunk))
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[chunk] = ids
            out.extend(ids)
        return out

    def _allowed(self, allowed_special: str | Iterable[str]) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            allowed_special = (allowed_special,)
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise TinyLLMError(
                f"allowed_special names unknown special tokens {sorted(unknown)}; this "
                f"tokenizer has {sorted(self.special_tokens)} (or pass 'all')."
            )
        return allowed

    def encode(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Text -> ids. Special tokens are recognised only if named in `allowed_special`
        (or it is "all"); otherwise '<|eos|>' in the text is encoded as ordinary text."""
        if not isinstance(text, str):
            raise TinyLLMError(
                f"encode expects a str, got {type(text).__name__}; use encode_bytes for bytes "
                "and encode_batch for a list of texts."
            )
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        split = self._special_re.get(allowed)
        if split is None:  # longest first so '<|a|>x' never shadows '<|a|>xy'
            alts = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
            split = self._special_re[allowed] = regex.compile(f"({alts})")
        out: list[int] = []
        for i, part in enumerate(split.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self._encode_ordinary(part))
        return out

    def encode_bytes(self, b: bytes) -> list[int]:
        """Any byte string -> ids (invalid UTF-8 included); decode_bytes inverts it exactly."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise TinyLLMError(f"encode_bytes expects bytes, got {type(b).__name__}")
        # undecodable bytes become lone surrogates, which text_to_bytes turns back into bytes
        return self._encode_ordinary(bytes(b).decode("utf-8", errors="surrogateescape"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
            ids = ids.tolist()
        vocab = self._vocab
        try:
            return b"".join([vocab[i] if i >= 0 else vocab[len(vocab)] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(vocab)]
            raise TinyLLMError(
                f"cannot decode ids {bad[:5]}: ids must be ints in [0, {len(vocab)})"
            ) from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids -> text. A cut in the middle of a UTF-8 character decodes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def encode_batch(
        self,
        texts: Iterable[str],
        num_workers: int | None = None,
        allowed_special: str | Iterable[str] = (),
    ) -> list[list[int]]:
        """Encode many texts; with several workers, in parallel processes (same result as
        serial). num_workers=None: all cores, but serial for small inputs."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TinyLLMError(f"encode_batch expects str items, got {type(t).__name__}")
        allowed = self._allowed(allowed_special)
        if num_workers is None:
            small = sum(map(len, texts)) < (1 << 20)
            num_workers = 1 if small else _num_cores()
        num_workers = max(1, min(int(num_workers), len(texts)))
        if num_workers == 1:
            return [self.encode(t, allowed) for t in texts]
        chunksize = max(1, len(texts) // (num_workers * 8))
        jobs = [(t, allowed) for t in texts]
        if "fork" in mp.get_all_start_methods():  # workers inherit this tokenizer as is
            global _WORKER_TOK
            _WORKER_TOK = self
            try:
                with mp.get_context("fork").Pool(num_workers) as pool:
                    packed = pool.map(_encode_worker, jobs, chunksize=chunksize)
            finally:
                _WORKER_TOK = None
            return [a.tolist() for a in packed]
        ctx = mp.get_context("spawn")  # workers rebuild it from its plain description
        with ctx.Pool(num_workers, initializer=_init_worker, initargs=(self.to_dict(),)) as pool:
            packed = pool.map(_encode_worker, jobs, chunksize=chunksize)
        return [a.tolist() for a in packed]

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able description (embedded in checkpoints; `from_dict` inverts it)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "pattern_name": pattern_name(self.pattern),
            "vocab_size": self.vocab_size,
            "byte_ids": None if self.byte_ids == list(range(256)) else list(self.byte_ids),
            "special_tokens": dict(self.special_tokens),
            "roles": dict(self.roles),
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "tokenizer dict") -> BPETokenizer:
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise TinyLLMError(
                f'{source} is not a tinyllm tokenizer (expected "format": "{FORMAT_NAME}"); '
                "for any tokenizer file (tinyllm, Hugging Face tokenizer.json, .tiktoken) use "
                "tinyllm.tokenizer.load_tokenizer(path)."
            )
        if d.get("version") != FORMAT_VERSION:
            raise TinyLLMError(
                f"{source} has tokenizer format version {d.get('version')!r}; this tinyllm "
                f"reads version {FORMAT_VERSION}. Re-create it with this version."
            )
        try:
            tok = cls(
                d["merges"],
                pattern=d["pattern"],
                special_tokens={str(k): int(v) for k, v in d["special_tokens"].items()},
                byte_ids=d.get("byte_ids"),
                roles=d.get("roles"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, TinyLLMError):
                raise TinyLLMError(f"{source}: {e}") from None
            raise TinyLLMError(f"{source} is malformed ({type(e).__name__}: {e}).") from None
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise TinyLLMError(
                f"{source} says vocab_size={d['vocab_size']} but defines {tok.vocab_size} ids."
            )
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Readable, versioned JSON (one merge per line); atomic write."""
        d = self.to_dict()
        merges = d.pop("merges")
        head = json.dumps(d, indent=2, ensure_ascii=False)[:-2]  # drop the closing "\n}"
        body = ",\n".join(f"    [{a}, {b}, {n}]" for a, b, n in merges)
        text = f'{head},\n  "merges": [\n{body}\n  ]\n}}\n'
        _atomic_write(Path(path), text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TinyLLMError(
                f"cannot read tokenizer file {str(path)!r} ({e.strerror})."
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinyLLMError(
                f"tokenizer file {str(path)!r} is not valid JSON ({e}); re-create it with "
                "BPETokenizer.save or python -m tinyllm.prepare."
            ) from None
        return cls.from_dict(d, source=f"tokenizer file {str(path)!r}")

    def sha256(self) -> str:
        """Hash of the canonical JSON of `to_dict()` (identifies the vocabulary exactly)."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:  # pickle via the plain description (the C
        return self.to_dict()  # encoder and the caches are rebuilt, not copied)

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(BPETokenizer.from_dict(d).__dict__)


def _id(x: Any) -> int:
    """A token id from a file: an integer; a float, bool or string is malformed."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"token ids must be integers, got {x!r}")
    return operator.index(x)


def _resolve_merges(
    merges: list[tuple[int, int, int]],
    vocab: list[bytes | None],
    owner: dict[int, str],
    claim: Any,
) -> None:
    """Give every merge result its bytes, in linear time whatever the order of the merges.

    A merge's parts are normally made by earlier merges, but HF's tiktoken converter also
    lists later-made parts, and a crafted file may list them in reverse: resolving in repeated
    passes would then be quadratic (10k reversed merges: 30 s). Instead each merge waits on
    the ids it lacks and is resolved the moment the last of them gets its bytes.
    """
    n = len(vocab)
    waiting: dict[int, list[int]] = {}  # id -> ranks of the merges waiting for its bytes
    lacking = [0] * len(merges)  # rank -> how many of its parts still lack bytes
    ready: list[int] = []
    for rank, (a, b, _new) in enumerate(merges):
        if not (0 <= a < n and 0 <= b < n):
            _undefined_part(rank, merges[rank])
        for part in {a, b}:
            if vocab[part] is None:
                waiting.setdefault(part, []).append(rank)
                lacking[rank] += 1
        if not lacking[rank]:
            ready.append(rank)
    while ready:
        rank = ready.pop()
        a, b, new = merges[rank]
        merged = vocab[a] + vocab[b]  # type: ignore[operator]
        # (a token listed by several merges, all making the same bytes, is allowed)
        if not (0 <= new < n and vocab[new] == merged and owner[new].startswith("merge")):
            claim(new, f"merge #{rank}")
        if vocab[new] is None:
            for r in waiting.pop(new, ()):
                lacking[r] -= 1
                if not lacking[r]:
                    ready.append(r)
        vocab[new] = merged
    stuck = [rank for rank, k in enumerate(lacking) if k]
    if stuck:
        _undefined_part(stuck[0], merges[stuck[0]])


def _undefined_part(rank: int, merge: tuple[int, int, int]) -> None:
    a, b, new = merge
    raise TinyLLMError(
        f"tokenizer merge #{rank} ({a}, {b}) -> {new} uses an id that no byte or merge "
        "defines; the merges list is malformed (re-create the file with BPETokenizer.save)."
    )


def _num_cores() -> int:
    """Cores this process may use (the affinity mask, which containers and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _atomic_write(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise TinyLLMError(f"cannot write tokenizer file {str(path)!r} ({e.strerror}).") from None


# ------------------------------------------------------------------ worker processes
_WORKER_TOK: BPETokenizer | None = None


def _init_worker(d: dict[str, Any]) -> None:
    global _WORKER_TOK
    _WORKER_TOK = BPETokenizer.from_dict(d)


def _encode_worker(args: tuple[str, frozenset[str]]) -> array:
    assert _WORKER_TOK is not None
    # an array of uint32 pickles as raw bytes: far cheaper to send back than a list of ints
    return array("I", _WORKER_TOK.encode(*args))
