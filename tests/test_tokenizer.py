"""Byte-level BPE tokenizer: exactness, round trips, files, interop, parity with peers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPETokenizer,
    load_tokenizer,
    read_hf,
    read_tiktoken,
    save_hf,
)
from tinyllm.tokenizer import train as train_mod
from tinyllm.tokenizer.train import count_chunks, learn_merges

HAS_C = train_mod._fastbpe is not None

# a small multilingual corpus: enough merges to exercise multi-byte tokens everywhere
CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?\n"
    "  Indented   lines\twith\ttabs\r\nand CRLF.\n\n"
    "Unicode: café naïve résumé — “quotes” … 日本語のテキスト、中文文本。한국어 텍스트.\n"
    "Emoji: 😀😃😄 👩‍👩‍👧 🇫🇷 ✓ Combining: e\u0301 a\u0308 n\u0303.\n"
    "Code: def f(x):\n    return x**2  # square\n"
) * 20


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=450, pattern="gpt4")


@pytest.fixture(scope="module")
def tok_gpt2() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=450, pattern="gpt2", special_tokens=[])


@pytest.fixture(scope="module")
def gpt2(shared_data: Path) -> BPETokenizer:
    path = shared_data / "gpt2.tiktoken"
    if not path.exists():
        pytest.skip("gpt2.tiktoken not found")
    return read_tiktoken(path, pattern="gpt2", special_tokens={"<|endoftext|>": 50256})


def _tiktoken_gpt2(shared_data: Path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(shared_data / "gpt2.tiktoken"))
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


# ---------------------------------------------------------------------------- training


def test_hand_checkable_merges() -> None:
    # "aaabdaaabac": aa (4x) first; then ab and (aa, a) tie at 2 -> smallest pair (97, 98)
    # wins; then (aa, ab) -> "aaab". Wikipedia's ZabdZabac -> ZYdZYac -> XdXac.
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 3)
    assert tok.merges == [(97, 97, 256), (97, 98, 257), (256, 257, 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.special_tokens == {"<|bos|>": 259, "<|eos|>": 260, "<|pad|>": 261}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (259, 260, 261)
    assert tok.vocab_size == 262
    assert tok.token_bytes(258) == b"aaab"


def test_tie_break_is_smallest_pair() -> None:
    # every pair occurs once: the smallest (left, right) ids are merged first
    tok = BPETokenizer.train("dcba", vocab_size=257, special_tokens=[])
    assert tok.merges == [(98, 97, 256)]


def test_fewer_merges_than_asked_warns() -> None:
    with pytest.warns(UserWarning, match="only supports"):
        tok = BPETokenizer.train("abab", vocab_size=1000, special_tokens=["<|eos|>"])
    assert tok.vocab_size == 256 + len(tok.merges) + 1
    assert tok.eos_id == tok.vocab_size - 1


@pytest.mark.skipif(not HAS_C, reason="C extension not built")
def test_c_trainer_equals_python_reference() -> None:
    counts = count_chunks(CORPUS, GPT4_PATTERN)
    assert learn_merges(counts, 400, use_c=True) == learn_merges(counts, 400, use_c=False)


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN])
def test_streaming_blocks_match_whole_text(
    pattern: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    expected = Counter(regex.findall(pattern, CORPUS))
    monkeypatch.setattr(train_mod, "BLOCK_CHARS", 37)  # cut words and whitespace runs
    assert count_chunks(CORPUS, pattern) == expected
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    assert count_chunks(path, pattern) == expected
    assert count_chunks([path, CORPUS], pattern) == expected + expected


def test_train_from_path_and_documents_equals_str(tok: BPETokenizer, tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    assert BPETokenizer.train(path, vocab_size=450) == tok
    # documents: chunks never span documents, so split only at a chunk boundary here
    docs = CORPUS.split("Code: ")
    docs = [docs[0]] + ["Code: " + d for d in docs[1:]]
    assert BPETokenizer.train(iter(docs), vocab_size=450).merges == tok.merges


def test_verbose_progress(capsys: pytest.CaptureFixture[str]) -> None:
    BPETokenizer.train(CORPUS, vocab_size=300, verbose=True)
    assert "merges" in capsys.readouterr().err


# ---------------------------------------------------------------------------- round trips

# pieces that stress the split patterns: whitespace runs, emoji (ZWJ, flags), combining
# marks, CJK, non-breaking/ideographic spaces, BOM, the largest code point
TRICKY = st.lists(
    st.sampled_from(
        [
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\u00a0",
            "\u3000",
            "abc",
            "XYZ",
            "09",
            "'s",
            ".",
            "?!",
            "é",
            "e\u0301",
            "日本",
            "😀",
            "👩\u200d👧",
            "🇫🇷",
            "\ufeff",
            "ß",
            "ΣΑ",
            "\U0010ffff",
        ]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), TRICKY))
def test_roundtrip_text(tok: BPETokenizer, tok_gpt2: BPETokenizer, s: str) -> None:
    for t in (tok, tok_gpt2):
        ids = t.encode(s)
        assert t.decode(ids) == s
        assert all(0 <= i < t.vocab_size for i in ids)
        assert t.encode_bytes(s.encode("utf-8")) == ids


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_roundtrip_bytes(tok: BPETokenizer, b: bytes) -> None:
    assert tok.decode_bytes(tok.encode_bytes(b)) == b


@pytest.mark.skipif(not HAS_C, reason="C extension not built")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), TRICKY))
def test_c_encoder_equals_python(tok: BPETokenizer, s: str) -> None:
    chunks = tok._split(s)
    py = [i for c in chunks for i in tok._bpe(c.encode("utf-8", errors="surrogatepass"))]
    assert tok._c.encode_chunks(chunks) == py


def test_whitespace_runs_and_long_input(tok: BPETokenizer) -> None:
    s = " " * 1000 + "\n" * 50 + "\t \n" * 30 + "x" * 500
    assert tok.decode(tok.encode(s)) == s


def test_decode_partial_utf8_replaces(tok: BPETokenizer) -> None:
    ids = tok.encode_bytes("é".encode()[:1])
    assert tok.decode(ids) == "\ufffd"
    assert tok.decode_bytes(ids) == b"\xc3"


# ---------------------------------------------------------------------------- specials


def test_special_tokens_only_when_allowed(tok: BPETokenizer) -> None:
    text = "<|bos|>hello<|eos|>"
    plain = tok.encode(text)
    assert tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.decode(plain) == text
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("hello")
    assert tok.decode(ids) == text
    only_bos = tok.encode(text, allowed_special={"<|bos|>"})
    assert only_bos[0] == tok.bos_id and tok.eos_id not in only_bos
    with pytest.raises(TinyLLMError, match="unknown special"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_special_id_clash_and_bad_roles() -> None:
    with pytest.raises(TinyLLMError, match="clash"):
        BPETokenizer([], special_tokens={"<|a|>": 256, "<|b|>": 256})
    with pytest.raises(TinyLLMError, match="clash"):
        BPETokenizer([(97, 97, 256)], special_tokens={"<|a|>": 256})
    with pytest.raises(TinyLLMError, match="dense"):
        BPETokenizer([], special_tokens={"<|a|>": 9999})
    with pytest.raises(TinyLLMError, match="role"):
        BPETokenizer([], special_tokens={"<|a|>": 256}, roles={"bos": "<|b|>"})


# ---------------------------------------------------------------------------- files


def test_save_load_roundtrip(tok: BPETokenizer, tmp_path) -> None:
    path = tmp_path / "tok.json"
    tok.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == "tinyllm.bpe" and d["version"] == 1 and d["pattern_name"] == "gpt4"
    loaded = BPETokenizer.load(path)
    assert loaded == tok and loaded.sha256() == tok.sha256()
    assert BPETokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok
    assert loaded.encode(CORPUS) == tok.encode(CORPUS)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


def test_sha256_depends_on_content(tok: BPETokenizer, tok_gpt2: BPETokenizer) -> None:
    assert len(tok.sha256()) == 64 and tok.sha256() != tok_gpt2.sha256()


def test_bad_files(tmp_path) -> None:
    with pytest.raises(TinyLLMError, match="cannot read"):
        BPETokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps({"format": "tinyllm.bpe", "version": 99}))
    with pytest.raises(TinyLLMError, match="version"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps({"format": "tinyllm.bpe", "version": 1, "pattern": "gpt4"}))
    with pytest.raises(TinyLLMError, match="malformed"):
        BPETokenizer.load(bad)
    d = BPETokenizer.train("abcabc", 259, special_tokens=[]).to_dict()
    d["merges"][0] = [1000, 97, 256]
    with pytest.raises(TinyLLMError, match="merge"):
        BPETokenizer.from_dict(d)
    tk = tmp_path / "bad.tiktoken"
    tk.write_text("not-base64!! zero\n")
    with pytest.raises(TinyLLMError, match="line 1"):
        read_tiktoken(tk)
    with pytest.raises(TinyLLMError, match="cannot read"):
        read_tiktoken(tmp_path / "missing.tiktoken")


# ---------------------------------------------------------------------------- bad input


def test_bad_input(tok: BPETokenizer, tmp_path) -> None:
    with pytest.raises(TinyLLMError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TinyLLMError, match="expects a str"):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TinyLLMError, match="expects bytes"):
        tok.encode_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(TinyLLMError, match="too small"):
        BPETokenizer.train(CORPUS, vocab_size=258)
    with pytest.raises(TinyLLMError, match="too small"):
        BPETokenizer.train(CORPUS, vocab_size="8192")  # type: ignore[arg-type]
    with pytest.raises(TinyLLMError, match="empty"):
        BPETokenizer.train("", vocab_size=300)
    with pytest.raises(TinyLLMError, match="empty"):
        BPETokenizer.train([], vocab_size=300)
    with pytest.raises(TinyLLMError, match="Decode bytes"):
        BPETokenizer.train(b"abc", vocab_size=300)  # type: ignore[arg-type]
    with pytest.raises(TinyLLMError, match="cannot read"):
        BPETokenizer.train(tmp_path / "missing.txt", vocab_size=300)
    with pytest.raises(TinyLLMError, match="pattern"):
        BPETokenizer.train(CORPUS, vocab_size=300, pattern="([unclosed")
    with pytest.raises(TinyLLMError, match="ids must be ints"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TinyLLMError, match="ids must be ints"):
        tok.decode([-1])
    with pytest.raises(TinyLLMError, match="str items"):
        tok.encode_batch(["ok", 3])  # type: ignore[list-item]


def test_custom_pattern() -> None:
    tok = BPETokenizer.train("ab ab ab", vocab_size=257, pattern=r"\S+|\s+", special_tokens=[])
    assert tok.encode("ab ab") == [256, 32, 256]
    assert BPETokenizer.from_dict(tok.to_dict()).pattern == r"\S+|\s+"


# ---------------------------------------------------------------------------- batch


def test_encode_batch_parallel_equals_serial(tok: BPETokenizer) -> None:
    texts = [CORPUS[i : i + 300] for i in range(0, 6000, 150)] + ["", "<|eos|>"]
    serial = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_workers=1) == serial
    assert tok.encode_batch(texts, num_workers=2) == serial
    assert tok.encode_batch(texts) == serial
    allowed = tok.encode_batch(texts, num_workers=2, allowed_special="all")
    assert allowed[-1] == [tok.eos_id]


def test_encode_batch_spawn_workers(tok: BPETokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS/Windows have no fork: workers rebuild the tokenizer from to_dict()
    import tinyllm.tokenizer.bpe as bpe_mod

    monkeypatch.setattr(bpe_mod.mp, "get_all_start_methods", lambda: ["spawn"])
    texts = [CORPUS[i : i + 200] for i in range(0, 2000, 100)]
    assert tok.encode_batch(texts, num_workers=2) == [tok.encode(t) for t in texts]


def test_pickle_and_copy(tok: BPETokenizer) -> None:
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone == tok and clone.encode(CORPUS[:500]) == tok.encode(CORPUS[:500])


# ---------------------------------------------------------------------------- interop


def test_gpt2_ranks_match_tiktoken(gpt2: BPETokenizer, shared_data: Path) -> None:
    enc = _tiktoken_gpt2(shared_data)
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 338_025
    assert ids == enc.encode_ordinary(text)
    assert gpt2.decode(ids) == text
    assert gpt2.vocab_size == 50257 and gpt2.bos_id == gpt2.eos_id == 50256 and gpt2.pad_id is None
    tricky = "naïve 日本語 😀 e\u0301  \n\n\t x<|endoftext|>y 1234567"
    assert gpt2.encode(tricky) == enc.encode_ordinary(tricky)
    assert gpt2.encode(tricky, allowed_special="all") == enc.encode(tricky, allowed_special="all")


def test_hf_export_parity(tok: BPETokenizer, tok_gpt2: BPETokenizer, tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    texts = [CORPUS[:2000], "  multiple   spaces\n\n\nnewlines\t\ttabs ", "😀👩‍👧 e\u0301 ß日本"]
    for t in (tok, tok_gpt2):
        path = tmp_path / "tokenizer.json"
        save_hf(t, path)
        hf = tokenizers.Tokenizer.from_file(str(path))
        for text in texts:
            assert hf.encode(text).ids == t.encode(text)
            assert hf.decode(t.encode(text)) == text
        # HF always splits on added (special) tokens: that is our allowed_special="all"
        s = "<|bos|>hi<|eos|>"
        assert hf.encode(s).ids == t.encode(s, allowed_special="all")
        assert read_hf(path) == t


def test_hf_gpt2_style_bytelevel_import(tok_gpt2: BPETokenizer, tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tinyllm.tokenizer.hf import to_hf_dict

    # GPT-2's own tokenizer.json has a lone ByteLevel pre-tokenizer (regex built in)
    d = to_hf_dict(tok_gpt2)
    d["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path))
    imported = read_hf(path)
    assert imported.pattern == GPT2_PATTERN
    assert hf.encode(CORPUS[:3000]).ids == imported.encode(CORPUS[:3000])
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("[")
        read_hf(tmp_path / "bad.json")


def test_gpt2_hf_roundtrip(gpt2: BPETokenizer, tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    save_hf(gpt2, path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = CORPUS[:5000]
    assert hf.encode(text).ids == gpt2.encode(text)
    back = read_hf(path)
    assert back.encode(text) == gpt2.encode(text) and back.vocab_size == 50257


def test_compression_close_to_hf_trainer(shared_data: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers

    path = shared_data / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")
    ours = BPETokenizer.train(text, vocab_size=4096, pattern="gpt4", special_tokens=[])
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # one document, as ours sees it (`train(files)` would split the file into lines first)
    hf.train_from_iterator([text], trainer)
    n_bytes = len(text.encode("utf-8"))
    ours_tpb = len(ours.encode(text)) / n_bytes
    hf_tpb = len(hf.encode(text).ids) / n_bytes
    assert ours.vocab_size == hf.get_vocab_size() == 4096
    assert abs(ours_tpb - hf_tpb) / hf_tpb < 0.01, (ours_tpb, hf_tpb)


def test_hf_file_converted_by_transformers(gpt2: BPETokenizer, shared_data: Path, tmp_path) -> None:
    # a tokenizer.json written by HF's own tiktoken converter (it lists every split of a
    # token as a merge, so one token id is made by several merges)
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(
        vocab_file=str(shared_data / "gpt2.tiktoken"),
        pattern=GPT2_PATTERN,
        extra_special_tokens={"<|endoftext|>": 50256},
    ).converted()
    path = tmp_path / "tokenizer.json"
    conv.save(str(path))
    imported = read_hf(path)
    assert imported.vocab_size == 50257 and imported.eos_id == 50256
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    text += " naïve 日本語 😀 e\u0301  \n\n\t x 1234567"
    assert imported.encode(text) == gpt2.encode(text) == conv.encode(text).ids


def test_load_tokenizer_reads_every_format_by_its_content(tok_gpt2: BPETokenizer, tmp_path) -> None:
    """One loader: tinyllm JSON, Hugging Face tokenizer.json (file or folder), .tiktoken."""
    import base64

    native, hf_dir = tmp_path / "tok.json", tmp_path / "hf"
    hf_dir.mkdir()
    tok_gpt2.save(native)
    save_hf(tok_gpt2, hf_dir / "tokenizer.json")
    assert load_tokenizer(native) == tok_gpt2
    assert load_tokenizer(hf_dir) == load_tokenizer(hf_dir / "tokenizer.json") == tok_gpt2
    # a ranks file of the same merges: ids are ranks, so byte b -> b and merge i -> 256 + i
    ranks = tmp_path / "t.tiktoken"
    lines = [f"{base64.b64encode(tok_gpt2.token_bytes(i)).decode()} {i}" for i in range(450)]
    ranks.write_text("\n".join(lines) + "\n")
    ours = load_tokenizer(ranks)
    assert ours.special_tokens == {"<|endoftext|>": 450}  # GPT-2's convention by default
    assert ours.encode(CORPUS[:500]) == tok_gpt2.encode(CORPUS[:500])
    assert load_tokenizer(ranks, special_tokens={}).vocab_size == 450
    # the core reads only its own format, and says which function reads the others
    with pytest.raises(TinyLLMError, match="load_tokenizer"):
        BPETokenizer.load(hf_dir / "tokenizer.json")
    (tmp_path / "x.json").write_text("[")
    with pytest.raises(TinyLLMError, match="not valid JSON.*tiktoken"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(TinyLLMError, match="cannot read"):
        load_tokenizer(tmp_path / "missing.tiktoken")
