"""GGUF export without llama.cpp: the file's metadata, its chat template, transformers' GGUF
loader (same logits), and the refusals. llama.cpp itself: tests/test_gguf_llamacpp.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf_utils import (
    HIDDEN_TEXTS,
    gpt2_config,
    llama_config,
    randomized,
    trained_tokenizer,
)

from tinyllm.errors import TinyLLMError
from tinyllm.export_gguf import chat_template_jinja, export_gguf, pre_tokenizer
from tinyllm.model import GPT

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok4():
    return trained_tokenizer("gpt4", 500)


def read_fields(path) -> dict:
    """The file's key/values as Python values (strings, ints, lists)."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, reader


def test_metadata_and_tokenizer(tok4, tmp_path) -> None:
    model = randomized(llama_config(tok4.vocab_size + 12))  # a padded vocabulary
    path = export_gguf(model, tok4, tmp_path / "m.gguf", chat_template={})
    fields, reader = read_fields(path)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "dbrx"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tok4.vocab_size + 12 and tokens[-1] == f"[PAD{tok4.vocab_size + 11}]"
    assert fields["tokenizer.ggml.bos_token_id"] == tok4.bos_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok4.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok4.pad_id
    assert tokens[tok4.eos_id] == "<|eos|>"
    assert fields["tokenizer.ggml.token_type"][tok4.eos_id] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == len(tok4.merges)
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == model.config.head_dim
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("pattern, pre", [("gpt2", "gpt-2"), ("gpt4", "dbrx")])
def test_pre_tokenizer_names(pattern: str, pre: str) -> None:
    from tinyllm.tokenizer import BPETokenizer

    assert pre_tokenizer(BPETokenizer([], pattern=pattern)) == pre


def test_custom_split_pattern_is_refused(tmp_path) -> None:
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer.train("some words here " * 20, 262, pattern=r"\w+|\s+|[^\w\s]+")
    with pytest.raises(TinyLLMError, match="split pattern .* is custom"):
        export_gguf(GPT(llama_config(tok.vocab_size)), tok, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_bytes_only_tokenizer_is_refused(tmp_path) -> None:
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer([], pattern="gpt4")
    with pytest.raises(TinyLLMError, match="without merges"):
        export_gguf(GPT(llama_config(tok.vocab_size)), tok, tmp_path / "m.gguf")


def test_chat_template_renders_our_prompt(tok4) -> None:
    """The Jinja template, rendered as HF and llama.cpp do and tokenized with specials, gives
    exactly the ids our ChatTemplate.encode_prompt gives (so llama.cpp's chat mode formats
    questions the way the model was trained)."""
    jinja2 = pytest.importorskip("jinja2")
    from tinyllm.chat import ChatTemplate

    for tmpl in (ChatTemplate(), ChatTemplate(user_prefix="Q: ", assistant_prefix="A:")):
        source = chat_template_jinja(tmpl.to_dict())
        conversations = [
            [{"role": "user", "content": "Who are you?"}],
            [
                {"role": "system", "content": "Be brief.\nVery."},
                {"role": "user", "content": 'Say "hi" (twice)'},
                {"role": "assistant", "content": "hi hi"},
                {"role": "user", "content": "Now 3 times, ünïcode."},
            ],
        ]
        for messages in conversations:
            text = jinja2.Template(source).render(
                messages=messages, add_generation_prompt=True, bos_token="<|bos|>",
                eos_token="<|eos|>",
            )  # fmt: skip
            ids = tok4.encode(text, allowed_special="all")
            assert ids == tmpl.encode_prompt(tok4, messages), text


def hf_logits(tmp_path, name: str, idx: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(n_kv_head=1, tie_weights=False), dict(n_kv_head=4)],
    ids=["gqa-tied", "mqa-untied", "mha"],
)
def test_transformers_loads_llama_export(tok4, tmp_path, kw: dict) -> None:
    # (bias=true is checked in llama.cpp only: transformers' GGUF loader builds a Llama
    # without attention/MLP biases and drops them)
    transformers = pytest.importorskip("transformers")
    model = randomized(llama_config(tok4.vocab_size, **kw))
    export_gguf(model, tok4, tmp_path / "m.gguf")
    idx = torch.randint(0, tok4.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
    theirs = hf_logits(tmp_path, "m.gguf", idx)
    assert (ours - theirs).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in HIDDEN_TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == tok4.encode(text), text


def test_q8_0_and_f16_are_smaller_and_close(tok4, tmp_path) -> None:
    model = randomized(llama_config(tok4.vocab_size), scale=0.05)
    sizes = {}  # bytes of tensor data (the tokenizer's metadata is the same in all three)
    for dtype in ("f32", "f16", "q8_0"):
        _, reader = read_fields(export_gguf(model, tok4, tmp_path / f"{dtype}.gguf", dtype))
        sizes[dtype] = sum(int(t.n_bytes) for t in reader.tensors)
    # (ffn_down rows of 176 are not whole 32-blocks: that matrix falls back to f16)
    assert sizes["q8_0"] < 0.7 * sizes["f16"] < 0.6 * sizes["f32"]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    # dequantized q8_0 weights stay within half a quantization step of ours (plus the
    # rounding of the block's scale, stored in f16: at most 127 * 2^-11 of a step)
    w = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    deq = gguf.quants.dequantize(w.data, w.tensor_type).reshape(-1)
    ref = model.transformer.h[0].attn.c_proj.weight.detach().numpy().reshape(-1)
    step = np.abs(ref).reshape(-1, 32).max(axis=1).repeat(32) / 127
    assert (np.abs(deq - ref) <= step * 0.57 + 1e-7).all()


def test_gpt2_export_metadata(tok4, tmp_path) -> None:
    model = randomized(gpt2_config(tok4.vocab_size, bias=False))
    export_gguf(model, tok4, tmp_path / "g.gguf")
    fields, reader = read_fields(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gpt2"
    names = {t.name for t in reader.tensors}
    assert {"position_embd.weight", "blk.1.attn_qkv.bias", "output_norm.bias"} <= names


@pytest.mark.parametrize(
    "kw, part",
    [
        (dict(pos="alibi"), "pos=alibi"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(activation="gelu"), "activation=gelu"),
    ],
)
def test_refuses_unsupported_architecture(tok4, tmp_path, kw: dict, part: str) -> None:
    with pytest.raises(TinyLLMError, match="Cannot export this model to GGUF") as e:
        export_gguf(GPT(llama_config(tok4.vocab_size, **kw)), tok4, tmp_path / "m.gguf")
    assert part in str(e.value)
    assert not list(tmp_path.iterdir())


def test_bad_dtype_and_unwritable_path(tok4, tmp_path) -> None:
    model = GPT(llama_config(tok4.vocab_size))
    with pytest.raises(TinyLLMError, match="dtype=q4_k is not supported for GGUF"):
        export_gguf(model, tok4, tmp_path / "m.gguf", dtype="q4_k")
    with pytest.raises(TinyLLMError, match="does not exist"):
        export_gguf(model, tok4, tmp_path / "no" / "such" / "m.gguf")
    with pytest.raises(TinyLLMError, match="is a directory"):
        export_gguf(model, tok4, tmp_path)


def test_cli(tok4, tmp_path) -> None:
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.export import run

    model = randomized(llama_config(tok4.vocab_size))
    save_checkpoint(tmp_path / "qa.ckpt", model, tok4, chat_template={"user_prefix": "Q: "})
    save_checkpoint(tmp_path / "alibi.ckpt", GPT(llama_config(tok4.vocab_size, pos="alibi")), tok4)
    run(str(tmp_path / "qa.ckpt"), str(tmp_path / "m.gguf"), "q8_0", "gguf")
    fields, _ = read_fields(tmp_path / "m.gguf")
    assert '"Q: "' in fields["tokenizer.chat_template"]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for args, message in [
        (("alibi.ckpt", "a.gguf", None, "gguf"), "pos=alibi"),
        (("qa.ckpt", "b.gguf", "bf16", "gguf"), "dtype=bf16"),
        (("qa.ckpt", "nodir/c.gguf", None, "gguf"), "does not exist"),
        (("missing.ckpt", "d.gguf", None, "gguf"), "not found"),
        (("qa.ckpt", "e.gguf", None, "onnx"), "format='onnx'"),
    ]:
        with pytest.raises(TinyLLMError, match=message):
            run(str(tmp_path / args[0]), str(tmp_path / args[1]), *args[2:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alibi.ckpt", "m.gguf", "qa.ckpt"]
    # The entry point: a user mistake is one paragraph on stderr and exit code 2.
    cmd = [sys.executable, "-m", "tinyllm.export", "ckpt=alibi.ckpt", "out=a.gguf", "format=gguf"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "pos=alibi" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
