"""prepare: text -> tokenizer.json + train.bin + val.bin + meta.json (the contract)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllm.data import prepare as prep
from tinyllm.data.prepare import default_data_dir, prepare_data, read_meta
from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer import BPETokenizer

TOK = {"vocab_size": 300, "pattern": "gpt4"}
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "far",
    "away",
    "from",
    "home",
    "and",
    "back",
    "again",
]


def _docs(n: int = 30) -> list[str]:
    rng = np.random.default_rng(0)
    return [
        f"Document {i}. " + " ".join(rng.choice(WORDS, size=40 + 7 * i)) + f"\nEnd {i}.\n"
        for i in range(n)
    ]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i, d in enumerate(_docs()):
        (root / f"doc{i:02d}.txt").write_text(d)
    return root


def _decode_split(out: Path, split: str) -> tuple[BPETokenizer, np.ndarray]:
    meta = read_meta(out)
    tok = BPETokenizer.load(out / "tokenizer.json")
    return tok, np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def _split_docs(tok: BPETokenizer, ids: np.ndarray) -> list[str]:
    """Cut a bin on EOS and decode each part."""
    cuts = np.flatnonzero(ids == tok.eos_id)
    parts = np.split(ids, cuts)
    return [tok.decode([int(t) for t in p if t != tok.eos_id]) for p in parts]


def test_prepare_by_document(folder: Path, tmp_path: Path) -> None:
    out = prepare_data({"source": "text", "path": str(folder)}, TOK, tmp_path / "out", False, 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    meta = read_meta(out)
    for key in prep.META_KEYS:
        assert key in meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert meta["source"]["checksum"] and meta["split"]["method"] == "document"
    tok = BPETokenizer.load(out / "tokenizer.json")
    assert meta["tokenizer_sha256"] == tok.sha256()
    docs = _docs()
    seen = []
    for split in ("train", "val"):
        tok, ids = _decode_split(out, split)
        st = meta["splits"][split]
        assert len(ids) == st["tokens"]
        parts = _split_docs(tok, ids)
        # EOS *between* documents: n documents, n - 1 separators
        assert len(parts) == st["documents"] and int((ids == tok.eos_id).sum()) == len(parts) - 1
        assert st["bytes"] == sum(len(p.encode()) for p in parts)
        assert all(p in docs for p in parts)  # whole documents only
        seen.append(set(parts))
    assert not seen[0] & seen[1]  # no leakage: a document is in one split only
    assert seen[0] | seen[1] == set(docs)
    val_share = meta["splits"]["val"]["bytes"] / sum(len(d) for d in docs)
    assert 0.08 < val_share < 0.25


def test_prepare_by_position_like_nanogpt(tmp_path: Path) -> None:
    text = "".join(_docs(12))
    (tmp_path / "one.txt").write_text(text)
    out = prepare_data({"source": "text", "path": str(tmp_path / "one.txt")}, TOK, tmp_path / "o")
    meta = read_meta(out)
    assert meta["split"]["method"] == "position"
    cut = int(len(text) * 0.9)  # train = text[: int(n * 0.9)], val = the rest
    for split, want in (("train", text[:cut]), ("val", text[cut:])):
        tok, ids = _decode_split(out, split)
        assert tok.decode(ids.tolist()) == want
        assert meta["splits"][split]["bytes"] == len(want.encode())


def test_val_tokens(folder: Path, tmp_path: Path) -> None:
    data = {"source": "text", "path": str(folder), "val_tokens": 1500}
    meta = read_meta(prepare_data(data, TOK, tmp_path / "o"))
    assert meta["split"]["val_tokens_requested"] == 1500
    assert 1000 < meta["splits"]["val"]["tokens"] < 3500  # whole documents: approximate


def test_gpt2_tokens_match_nanogpt_on_shakespeare(shared_data: Path, tmp_path: Path) -> None:
    """The shared README's figure: GPT-2 BPE gives 301,966 train + 36,059 val tokens."""
    data = {"source": "shakespeare", "path": str(shared_data / "tinyshakespeare.txt")}
    tok = {"path": str(shared_data / "gpt2.tiktoken"), "pattern": "gpt2"}
    meta = read_meta(prepare_data(data, tok, tmp_path / "s"))
    assert meta["splits"]["train"]["tokens"] == 301_966
    assert meta["splits"]["val"]["tokens"] == 36_059
    assert meta["source"]["file_sha256"] == (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    )


def test_reuse_force_and_content_change(folder: Path, tmp_path: Path) -> None:
    data = {"source": "text", "path": str(folder)}
    out = prepare_data(data, TOK, tmp_path / "o")
    stamp = (out / "train.bin").stat().st_mtime_ns
    created = read_meta(out)["created_at"]
    prepare_data(data, TOK, out)  # same inputs: reused, untouched
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    os.utime(out / "meta.json", ns=(0, 0))
    prepare_data(data, TOK, out, force=True)
    assert (out / "meta.json").stat().st_mtime_ns != 0
    h = read_meta(out)["config_hash"]
    (folder / "doc00.txt").write_text("changed content " * 20)
    prepare_data(data, TOK, out)
    assert read_meta(out)["config_hash"] != h and created


def test_reuse_a_tokenizer(folder: Path, tmp_path: Path) -> None:
    first = prepare_data({"source": "text", "path": str(folder)}, TOK, tmp_path / "a")
    tok_cfg = {"path": str(first / "tokenizer.json")}
    second = prepare_data({"source": "pydocs"}, tok_cfg, tmp_path / "b")
    assert read_meta(second)["tokenizer_sha256"] == read_meta(first)["tokenizer_sha256"]
    with pytest.raises(TinyLLMError, match="tokenizer.path=.*is not a file"):
        prepare_data({"source": "pydocs"}, {"path": str(tmp_path / "no.json")}, tmp_path / "c")


def test_dtype_choice() -> None:
    assert prep.token_dtype(300) == "uint16"
    assert prep.token_dtype(65536) == "uint16"
    assert prep.token_dtype(65537) == "uint32"


def test_interrupted_prepare_leaves_no_complete_looking_folder(
    folder: Path, tmp_path: Path, monkeypatch
) -> None:
    data = {"source": "text", "path": str(folder)}
    out = prepare_data(data, TOK, tmp_path / "o")

    calls = []

    def boom(task):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(task)

    real = prep._encode_task
    monkeypatch.setattr(prep, "_encode_task", boom)
    monkeypatch.setattr(prep, "PIECE_BYTES", 64)  # many small tasks
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data, TOK, out, force=True, num_workers=1)
    assert not (out / "meta.json").exists()  # the old result no longer looks complete
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # temporaries cleaned up
    with pytest.raises(TinyLLMError, match="has no meta.json.*force=true"):
        read_meta(out)
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data, TOK, fresh, num_workers=1)
    assert sorted(p.name for p in fresh.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"val_fraction": 1.5}, r"data.val_fraction=1.5 must be in \(0, 1\)"),
        ({"split": "random"}, "data.split='random' is not a split method"),
        ({"split": "document"}, "needs at least 2 documents"),
        ({"val_fraction": 0.0001, "files": 2}, "The val split came out empty"),
        ({"bad_files": "skip", "all_bad": True}, "holds no text"),
    ],
)
@pytest.mark.filterwarnings("ignore:the corpus only supports")
def test_bad_settings(tmp_path: Path, data: dict, needle: str) -> None:
    content = b"\xff\xfe bad" if data.pop("all_bad", False) else b"tiny text. " * 5
    files = data.pop("files", 1)
    for i in range(files):
        (tmp_path / f"c{i}.txt").write_bytes(content)
    path = str(tmp_path / "c0.txt") if files == 1 else str(tmp_path / "*.txt")
    with pytest.raises(TinyLLMError, match=needle):
        prepare_data({"source": "text", "path": path, **data}, TOK, tmp_path / "o")


def test_read_meta_rejects_broken_folders(folder: Path, tmp_path: Path) -> None:
    out = prepare_data({"source": "text", "path": str(folder)}, TOK, tmp_path / "o")
    with open(out / "val.bin", "ab") as f:
        f.write(b"\x00")  # an odd size: truncated or foreign
    with pytest.raises(TinyLLMError, match="not a multiple of 2"):
        read_meta(out)
    with open(out / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(TinyLLMError, match="do not belong together"):
        read_meta(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        read_meta(out)
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(TinyLLMError, match="lacks the keys"):
        read_meta(out)
    with pytest.raises(TinyLLMError, match="is not a folder"):
        read_meta(tmp_path / "nowhere")


def test_default_data_dir() -> None:
    """<root>/<name>-<vocab or tokenizer file>-<hash of the settings> (tests/test_safety.py)."""
    d = default_data_dir({"name": "pydocs"}, {"vocab_size": 2048})
    assert d.parent == Path("data") and re.fullmatch(r"pydocs-2048-[0-9a-f]{8}", d.name)
    d = default_data_dir({"source": "text"}, {"path": "x/gpt2.tiktoken"}, "d")
    assert d.parent == Path("d") and re.fullmatch(r"text-gpt2-[0-9a-f]{8}", d.name)


def test_entry_point(folder: Path, tmp_path: Path, repo_root: Path) -> None:
    cmd = [sys.executable, "-m", "tinyllm.prepare", "data=text", f"data.path={folder}"]
    ok = subprocess.run(
        [*cmd, "tokenizer.vocab_size=300", f"out_dir={tmp_path / 'o'}", "num_workers=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    meta = read_meta(tmp_path / "o")
    assert meta["created_by"].startswith("python -m tinyllm.prepare data=text")
    assert not (tmp_path / "outputs").exists()  # prepare leaves no Hydra run folder
    bad = subprocess.run(
        [*cmd[:-1], f"data.path={tmp_path / 'missing.txt'}"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "missing.txt does not exist" in bad.stderr


def test_every_data_conf_composes(repo_root: Path) -> None:
    """conf/data/<name>.yaml: name == file stem, a known source; prepare.yaml composes."""
    from hydra import compose, initialize_config_dir

    from tinyllm.data.sources import SOURCES

    names = sorted(p.stem for p in (repo_root / "conf" / "data").glob("*.yaml"))
    assert {"pydocs", "stdlib", "text", "shakespeare", "tinystories", "qa"} <= set(names)
    with initialize_config_dir(str(repo_root / "conf"), version_base="1.3"):
        for name in names:
            cfg = compose("prepare", overrides=[f"data={name}"])
            assert cfg.data.name == name and cfg.data.source in SOURCES
        cfg = compose("prepare")
    assert cfg.data.name == "pydocs" and cfg.tokenizer.vocab_size == 4096
    assert cfg.out_dir is None and cfg.force is False and cfg.num_workers is None
    assert default_data_dir(cfg.data, cfg.tokenizer, cfg.data_root) == default_data_dir(
        {"name": "pydocs", "source": "pydocs"}, {}
    )  # (the defaults filled in or not: one folder)
