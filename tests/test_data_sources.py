"""Corpus sources: the embedded corpora, text files/folders/globs, bad files, downloads."""

from __future__ import annotations

import hashlib
import http.server
import threading
import warnings
from pathlib import Path

import pytest

from tinyllm.data import sources
from tinyllm.data.sources import (
    download,
    get_source,
    iter_documents,
    iter_pieces,
    scan,
    stdlib_files,
)
from tinyllm.errors import TinyLLMError


def test_pydocs_one_document_per_topic() -> None:
    from pydoc_data.topics import topics

    docs = list(iter_documents({"source": "pydocs"}))
    assert len(docs) == len(topics)
    assert docs == [topics[k] for k in sorted(topics)]  # deterministic order, exact text


def test_stdlib_sorted_without_site_packages() -> None:
    files = stdlib_files()
    assert len(files) > 100
    assert not any("site-packages" in f.parts for f in files)
    assert all(f.suffix == ".py" for f in files)
    assert files == stdlib_files()  # deterministic


def _write(root: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)


def test_text_file_folder_glob(tmp_path: Path) -> None:
    _write(tmp_path, {"b.txt": "bee", "a.txt": "ay", "sub/c.md": "see", "sub/skip.bin": "x"})
    assert list(iter_documents({"source": "text", "path": str(tmp_path / "a.txt")})) == ["ay"]
    # folders: recursive, by extension, sorted by relative path
    assert list(iter_documents({"source": "text", "path": str(tmp_path)})) == ["ay", "bee", "see"]
    docs = iter_documents({"source": "text", "path": str(tmp_path), "extensions": [".md"]})
    assert list(docs) == ["see"]
    assert list(iter_documents({"source": "text", "path": str(tmp_path / "*.txt")})) == [
        "ay",
        "bee",
    ]


def test_text_separator_across_read_blocks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "READ_BYTES", 7)  # the separator straddles read blocks
    _write(tmp_path, {"s.txt": "one story\n<|endoftext|>\ntwo\n<|endoftext|>\n\nthree\n"})
    cfg = {"source": "text", "path": str(tmp_path / "s.txt"), "separator": "<|endoftext|>"}
    assert list(iter_documents(cfg)) == ["one story", "two", "three"]


@pytest.mark.parametrize(
    ("path", "needle"),
    [("nope/missing.txt", "does not exist"), ("nope/*.txt", "matches no file")],
)
def test_text_bad_paths(tmp_path: Path, path: str, needle: str) -> None:
    with pytest.raises(TinyLLMError, match=needle) as e:
        get_source({"source": "text", "path": str(tmp_path / path)})
    assert "data.path" in str(e.value)


def test_text_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(TinyLLMError, match="data.path=FILE"):
        get_source({"source": "text"})
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TinyLLMError, match="data.extensions"):
        get_source({"source": "text", "path": str(tmp_path / "empty_dir")})
    with pytest.raises(TinyLLMError, match="Valid: pydocs, stdlib, text"):
        get_source({"source": "wikipedia"})


def test_bad_files_policy(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "good.txt": "fine text",
            "empty.txt": b"",
            "binary.txt": b"\x00\x01\x02PNG",
            "latin1.txt": "caf\xe9".encode("latin-1"),
        },
    )
    src = get_source({"source": "text", "path": str(tmp_path)})
    res = scan(src, "replace")
    assert (len(res.empty), len(res.binary), len(res.bad_utf8)) == (1, 1, 1)
    docs = ["".join(p for p, _ in iter_pieces(src, res))]
    assert "caf\ufffd" in docs[0] and "fine text" in docs[0] and "PNG" not in docs[0]
    res = scan(src, "skip")
    assert res.report()["skipped"] == 3 and res.documents == 1
    with pytest.raises(TinyLLMError, match=r"binary\.txt looks binary.*bad_files=skip"):
        scan(src, "error")
    (tmp_path / "binary.txt").unlink()
    with pytest.raises(TinyLLMError, match=r"Cannot read .*binary\.txt"):
        scan(src, "error")  # a file that vanished after the listing
    src = get_source({"source": "text", "path": str(tmp_path)})
    with pytest.raises(TinyLLMError, match=r"latin1\.txt is not valid UTF-8.*iconv"):
        scan(src, "error")
    with pytest.raises(TinyLLMError, match="data.bad_files='ignore' is not a policy"):
        scan(src, "ignore")


def test_pieces_cut_only_where_tokenization_is_unchanged(monkeypatch) -> None:
    """Long documents are encoded in pieces: the tokens must equal the whole's."""
    from tinyllm.tokenizer import BPETokenizer

    text = "".join(
        f"Speaker {i}:\nWell, {i}?\n\n  indented {i}!\nlast line, {i} ...\r\n\n" for i in range(300)
    )
    monkeypatch.setattr(sources, "PIECE_BYTES", 50)
    pieces = list(sources._split_stream(iter([text]), None))
    assert len(pieces) > 50 and "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    for pattern in ("gpt2", "gpt4"):
        tok = BPETokenizer.train(text, 300, pattern=pattern)
        assert sum((tok.encode(p) for p, _ in pieces), []) == tok.encode(text)


def test_pieces_random_text(monkeypatch) -> None:
    """Random mixes of letters, digits, punctuation, apostrophes and whitespace runs."""
    import numpy as np
    import regex

    from tinyllm.tokenizer.patterns import resolve_pattern

    monkeypatch.setattr(sources, "PIECE_BYTES", 20)
    alphabet = list("ab  \n\n\r\t'sll99.,!?-") + ["é", "ж", " x", "'re ", "\n\n  "]
    rng = np.random.default_rng(0)
    # the pre-split chunks decide the tokens: compare them directly (stronger than encoding
    # with a small vocabulary, where most chunkings give the same byte tokens)
    splitters = [regex.compile(resolve_pattern(p)) for p in ("gpt2", "gpt4")]
    for _ in range(60):
        text = "".join(rng.choice(alphabet, size=400))
        pieces = [p for p, _ in sources._split_stream(iter([text]), None)]
        assert "".join(pieces) == text and len(pieces) > 3
        for split in splitters:
            assert sum((split.findall(p) for p in pieces), []) == split.findall(text)


def test_paragraph_text_is_cut(monkeypatch) -> None:
    # one paragraph per line, blank lines between: still cut into bounded pieces
    monkeypatch.setattr(sources, "PIECE_BYTES", 100)
    text = "\n\n".join("A paragraph of several words here." for _ in range(200))
    pieces = list(sources._split_stream(iter([text]), None))
    assert max(len(p) for p, _ in pieces) < 200 and "".join(p for p, _ in pieces) == text


# --------------------------------------------------------------------------------------------
# downloads, against a local HTTP server that understands Range


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    log: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).log.append(rng)
        data, status = self.payload, 200
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            data, status = self.payload[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    payload = ("To be, or not to be, that is the question.\n" * 2000).encode()
    handler = type("H", (_RangeHandler,), {"payload": payload, "log": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/input.txt"
    yield url, payload, handler
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_and_caches(tmp_path: Path, server) -> None:
    url, payload, handler = server
    sha = hashlib.sha256(payload).hexdigest()
    dest = download(url, tmp_path / "f.txt", sha, progress=False)
    assert dest.read_bytes() == payload and not (tmp_path / "f.txt.part").exists()
    download(url, tmp_path / "f.txt", sha, progress=False)
    assert len(handler.log) == 1  # cached: no second request


def test_download_resumes_with_range(tmp_path: Path, server) -> None:
    url, payload, handler = server
    (tmp_path / "f.txt.part").write_bytes(payload[:1000])
    dest = download(url, tmp_path / "f.txt", hashlib.sha256(payload).hexdigest(), progress=False)
    assert handler.log == ["bytes=1000-"] and dest.read_bytes() == payload


def test_download_checksum_mismatch(tmp_path: Path, server) -> None:
    url, _, _ = server
    with pytest.raises(TinyLLMError, match="expected 0000.*data.path=/local/copy.txt"):
        download(url, tmp_path / "f.txt", "0" * 64, local_hint="/local/copy.txt", progress=False)
    assert not (tmp_path / "f.txt").exists() and not (tmp_path / "f.txt.part").exists()


def test_download_offline_error(tmp_path: Path) -> None:
    with pytest.raises(TinyLLMError, match=r"offline.*data\.path=\.\./shared/data/x\.txt"):
        download(
            "http://127.0.0.1:9/x.txt", tmp_path / "x.txt", None, "../shared/data/x.txt", 5, False
        )


def test_download_trust_on_first_use(tmp_path: Path, server) -> None:
    url, payload, _ = server
    with pytest.warns(UserWarning, match="trust on"):
        download(url, tmp_path / "f.txt", None, progress=False)
    assert (tmp_path / "f.txt.sha256").read_text().strip() == hashlib.sha256(payload).hexdigest()
    (tmp_path / "f.txt").write_bytes(b"tampered")
    with pytest.raises(TinyLLMError, match="moved to"):
        download(url, tmp_path / "f.txt", None, progress=False)


def test_known_corpus_downloads_into_cache(tmp_path: Path, server, monkeypatch) -> None:
    url, payload, _ = server
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(sources.KNOWN_CORPORA["shakespeare"], "url", url)
    monkeypatch.setitem(sources.KNOWN_CORPORA["shakespeare"], "sha256", sha)
    docs = list(iter_documents({"source": "shakespeare"}))
    assert docs == [payload.decode()]
    assert (tmp_path / "cache" / "tinyshakespeare.txt").is_file()


def test_known_corpus_local_copy(tmp_path: Path, shared_data: Path) -> None:
    cfg = {"source": "shakespeare", "path": str(shared_data / "tinyshakespeare.txt")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published hash matches: no warning
        res = scan(get_source(cfg))
        list(iter_pieces(get_source(cfg), res))
    assert res.file_sha256 == sources.KNOWN_CORPORA["shakespeare"]["sha256"]
    other = tmp_path / "mine.txt"
    other.write_text("not shakespeare")
    with pytest.warns(UserWarning, match="not the published"):
        list(iter_documents({"source": "shakespeare", "path": str(other)}))
    with pytest.raises(TinyLLMError, match="is not a file"):
        get_source({"source": "shakespeare", "path": str(tmp_path / "nope.txt")})
