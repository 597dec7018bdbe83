"""Export a tinyllm model to one GGUF file, which llama.cpp, Ollama and LM Studio run.

    python -m tinyllm.export ckpt=PATH out=FILE.gguf format=gguf [dtype=f32|f16|q8_0]  (contract)

GGUF is llama.cpp's single-file format: key/value metadata (architecture, sizes, the whole
tokenizer, the chat template) followed by the tensors. It is written with the `gguf` package,
the llama.cpp project's own writer. The same two architectures as the Hugging Face export:

- Llama (`llama`): rope + rmsnorm + swiglu, any n_kv_head. llama.cpp's Llama uses the
  interleaved rope layout (pairs (0,1), (2,3), ...) while ours, like HF's, rotates the two
  halves (i, i + D/2). Permuting the rows of W_q and W_k turns one into the other; it is the
  same permutation llama.cpp's own convert_hf_to_gguf.py applies.
- GPT-2 (`gpt2`): learned + layernorm + gelu. Caveat, measured in tests/test_export_gguf.py:
  llama.cpp's GPT-2 graph computes GELU with the tanh approximation through an fp16 table,
  ours is the exact erf form, so logits agree less closely than for Llama.

The tokenizer goes inside, byte-level BPE as in GPT-2's files: token strings pass the bytes
through GPT-2's byte -> printable-character map, merges are "left right" pairs in priority
order, special tokens are CONTROL tokens (so text that merely looks like `<|eos|>` stays text).
llama.cpp does not read the split regex from the file: it has named pre-tokenizers, and the
name must be one whose built-in regex is ours (see `PRE_TOKENIZERS`). A custom split pattern
has no name there and is refused rather than exported to tokenize differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyllm.errors import TinyLLMError
from tinyllm.families import hf_family, llama_tensors
from tinyllm.io import atomic_write, unwrap_compiled
from tinyllm.model import GPT

GGUF_DTYPES = ("f32", "f16", "q8_0")
_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16"}

# Our split pattern -> the llama.cpp pre-tokenizer whose built-in regex is the same.
# - GPT-2's regex is llama.cpp's "gpt-2" type.
# - GPT-4's (cl100k) regex is the one Llama 3 uses (llama.cpp's `\s*[\r\n]+` matches the same
#   text as cl100k's `\s*[\r\n]`, since `\s*` is greedy). "llama-bpe" would also switch on
#   `ignore_merges` (a whole piece found in the vocabulary is taken as one token without
#   running the merges); "dbrx" has the same regex with plain rank-order merging, which is
#   exactly our algorithm.
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "dbrx"}


def normalize_dtype(dtype: str) -> str:
    d = _ALIASES.get(str(dtype), str(dtype))
    if d not in GGUF_DTYPES:
        raise TinyLLMError(
            f"dtype={dtype} is not supported for GGUF export. Use one of {', '.join(GGUF_DTYPES)} "
            "(f32: exact; f16: half the size; q8_0: 8-bit blocks, about a quarter of f32)."
        )
    return d


def pre_tokenizer(tokenizer: Any) -> str:
    """The llama.cpp pre-tokenizer name for the tokenizer's split pattern, or a TinyLLMError."""
    from tinyllm.tokenizer.patterns import pattern_name

    name = pattern_name(tokenizer.pattern)
    if name not in PRE_TOKENIZERS:
        raise TinyLLMError(
            f"Cannot export this tokenizer to GGUF: its split pattern {tokenizer.pattern[:60]!r} "
            "is custom, and llama.cpp only knows its own named pre-tokenizers (it does not read "
            "a regex from the file), so it would cut text differently and the model would see "
            "other tokens. Train the tokenizer with `tokenizer.pattern=gpt4` or `gpt2`, or use "
            "the Hugging Face export (format=hf), which carries the regex."
        )
    return PRE_TOKENIZERS[name]


# ------------------------------------------------------------------------------ chat template


def _literal(s: str) -> str:
    """A Jinja string literal (JSON's escapes are a subset Jinja and llama.cpp both read)."""
    return json.dumps(s, ensure_ascii=False)


def chat_template_jinja(template: Any) -> str:
    """Our ChatTemplate as the Jinja template HF and llama.cpp render (`messages`,
    `add_generation_prompt`, `bos_token`, `eos_token`), giving the same text our
    `encode_prompt` encodes, with <bos>/<eos> as the special tokens' names."""
    from tinyllm.chat import ChatTemplate

    t = ChatTemplate.coerce(template)
    L = _literal
    bos = "{{ bos_token }}" if t.add_bos else ""
    eos = " + eos_token" if t.add_eos else ""
    return (
        bos + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        f"{{{{ {L(t.system_prefix)} + message['content'] + {L(t.system_suffix)} }}}}"
        "{% elif message['role'] == 'user' %}"
        f"{{{{ {L(t.user_prefix)} + message['content'] + {L(t.user_suffix)} }}}}"
        "{% elif message['role'] == 'assistant' %}"
        f"{{{{ {L(t.assistant_prefix + t.answer_lead)} + message['content'] + "
        f"{L(t.assistant_suffix)}{eos} }}}}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {L(t.assistant_prefix)} }}}}{{% endif %}}"
    )


# ------------------------------------------------------------------------------ tokenizer


def _add_tokenizer(w: Any, tok: Any, n_rows: int, chat_template: Any) -> None:
    """The vocabulary (padded to the embedding's rows), merges, special ids, chat template."""
    import gguf

    from tinyllm.tokenizer.hf import _tok_str

    specials = set(tok.special_tokens.values())
    names = {i: s for s, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        if i in specials:
            tokens.append(names[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(_tok_str(tok.token_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
    for i in range(tok.vocab_size, n_rows):  # embedding rows no token uses (a padded vocab)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [
        f"{_tok_str(tok.token_bytes(a))} {_tok_str(tok.token_bytes(b))}" for a, b, _ in tok.merges
    ]
    w.add_tokenizer_model("gpt2")  # byte-level BPE, whatever the model architecture
    w.add_tokenizer_pre(pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for role in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{role}_id")
        if tid is not None:
            getattr(w, f"add_{role}_token_id")(int(tid))
    # Our encode adds no special tokens; a chat template writes its own bos.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template_jinja(chat_template))


# ------------------------------------------------------------------------------ tensors


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of one head go from half-split order [x0..x_{D/2-1}, y0..] to interleaved
    [x0, y0, x1, y1, ...] (llama.cpp's Llama rope); works for weights [H*D, C] and biases."""
    D = w.shape[0] // n_heads
    shape = w.shape
    w = w.reshape(n_heads, 2, D // 2, *shape[1:])  # [H, 2 halves, D/2, ...]
    return w.swapaxes(1, 2).reshape(shape)  # [H, D/2, 2, ...] -> rows interleaved


# llama.cpp's names (gguf's MODEL_TENSOR names for LLM_ARCH_LLAMA) for the roles of
# families.llama_tensors
_GGUF_LLAMA = {
    "embed": "token_embd.{kind}",
    "attn_norm": "blk.{i}.attn_norm.{kind}",
    "q": "blk.{i}.attn_q.{kind}",
    "k": "blk.{i}.attn_k.{kind}",
    "v": "blk.{i}.attn_v.{kind}",
    "o": "blk.{i}.attn_output.{kind}",
    "ffn_norm": "blk.{i}.ffn_norm.{kind}",
    "gate": "blk.{i}.ffn_gate.{kind}",
    "up": "blk.{i}.ffn_up.{kind}",
    "down": "blk.{i}.ffn_down.{kind}",
    "final_norm": "output_norm.{kind}",
    "head": "output.{kind}",  # tied: llama.cpp reuses token_embd as the output matrix
}


def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    heads = {"q": model.config.n_head, "k": model.config.kv_heads}  # rope rows to interleave
    out = {}
    for role, i, kind, t in llama_tensors(model):
        t = _rope_permute(t, heads[role]) if role in heads else t
        out[_GGUF_LLAMA[role].format(i=i, kind=kind)] = t
    return out


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    c, sd = model.config, model.state_dict()

    def bias(key: str, size: int) -> torch.Tensor:
        # llama.cpp's GPT-2 requires every bias; a model trained with bias=false writes zeros.
        return sd[key] if key in sd else torch.zeros(size)

    out = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["pos.wpe.weight"],
    }
    names = {
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(c.n_layer):
        ours, g = f"transformer.h.{i}.", f"blk.{i}."
        for ln, name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[g + f"{name}.weight"] = sd[ours + f"{ln}.weight"]
            out[g + f"{name}.bias"] = bias(ours + f"{ln}.bias", c.n_embd)
        for src, dst in names.items():  # nn.Linear's [out, in] is ggml's layout as it is
            w = sd[ours + f"{src}.weight"]
            out[g + f"{dst}.weight"] = w
            out[g + f"{dst}.bias"] = bias(ours + f"{src}.bias", w.size(0))
    out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    out["output_norm.bias"] = bias("transformer.ln_f.bias", c.n_embd)
    if not c.tie_weights:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def _add_tensor(w: Any, name: str, t: torch.Tensor, dtype: str) -> None:
    """1-D tensors (norms, biases) stay f32, as llama.cpp's converter does; matrices take the
    chosen dtype. q8_0 needs rows in blocks of 32; a matrix whose rows are not falls back to
    f16 (also as the converter does)."""
    import gguf

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim == 1 or dtype == "f32":
        w.add_tensor(name, a)
    elif dtype == "q8_0" and a.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
    else:
        w.add_tensor(name, a.astype(np.float16))


# ------------------------------------------------------------------------------ the file


def _metadata(w: Any, model: GPT, family: str, dtype: str) -> None:
    import gguf

    c = model.config
    hidden = model.transformer.h[0].mlp.hidden
    w.add_name("tinyllm")
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(hidden)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    if family == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_freq_base(float(c.rope_theta))
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(float(c.norm_eps))
    else:
        w.add_layer_norm_eps(float(c.norm_eps))
    ftype = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[dtype]
    w.add_file_type(getattr(gguf.LlamaFileType, ftype))


def check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be written (missing folder, no permission)."""
    parent = out.resolve().parent
    if out.is_dir():
        raise TinyLLMError(f"out={out} is a directory; GGUF export writes one file (FILE.gguf).")
    if not parent.is_dir():
        raise TinyLLMError(
            f"Cannot write out={out}: the folder {parent} does not exist. Create it first "
            f"(mkdir -p {parent}) or choose another path."
        )
    if not os.access(parent, os.W_OK):
        raise TinyLLMError(
            f"Cannot write out={out}: no write permission in {parent}. Choose a writable folder."
        )


def export_gguf(
    model: GPT,
    tokenizer: Any,
    out: str | os.PathLike,
    dtype: str = "f32",
    chat_template: Any = None,
) -> Path:
    """Write `model` and `tokenizer` (a BPETokenizer) as one GGUF file; returns its path.

    `chat_template` (a ChatTemplate or its dict, as a Q&A checkpoint stores it) goes in as the
    Jinja `tokenizer.chat_template`. Raises TinyLLMError, before writing anything, for an
    architecture or split pattern llama.cpp cannot represent, a bad dtype or an unwritable path.
    """
    import gguf

    model = unwrap_compiled(model)
    dtype = normalize_dtype(dtype)
    family = hf_family(model.config, target="GGUF")
    if tokenizer is None:
        raise TinyLLMError("GGUF export needs the tokenizer (llama.cpp reads it from the file).")
    pre_tokenizer(tokenizer)  # refuse a custom split pattern before writing
    if not tokenizer.merges:  # (the gguf writer drops an empty array; llama.cpp needs the key)
        raise TinyLLMError(
            "Cannot export a tokenizer without merges (bytes only) to GGUF: llama.cpp's BPE "
            "requires a merges list. Train the tokenizer with vocab_size above 256 + specials."
        )
    out = Path(out)
    check_writable(out)
    tensors = (_llama_tensors if family == "llama" else _gpt2_tensors)(model)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch=family)
        _metadata(w, model, family, dtype)
        _add_tokenizer(w, tokenizer, model.config.vocab_size, chat_template)
        for name, t in tensors.items():
            _add_tensor(w, name, t, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    try:
        atomic_write(out, write)  # a temporary name beside `out`, renamed when complete
    except OSError as e:
        raise TinyLLMError(
            f"Cannot write out={out} ({e.strerror or e}). Choose another path."
        ) from None
    return out


def run_gguf(ckpt: str, out: str, dtype: str = "f32") -> Path:
    """The CLI: checkpoint -> GGUF file (with the chat template of a Q&A checkpoint)."""
    from tinyllm.checkpoint import (
        model_from_checkpoint,
        read_checkpoint,
        resolve_ckpt,
        tokenizer_from_checkpoint,
    )

    dtype = normalize_dtype(dtype)
    check_writable(Path(out))
    path = resolve_ckpt(ckpt)
    ck = read_checkpoint(path)
    model, tokenizer = model_from_checkpoint(ck, path), tokenizer_from_checkpoint(ck, path)
    chat = ck["hyper_parameters"].get("chat_template")
    file = export_gguf(model.eval(), tokenizer, out, dtype=dtype, chat_template=chat)
    size = file.stat().st_size / 2**20
    print(
        f"exported {path} -> {file} as GGUF {hf_family(model.config, target='GGUF')} "
        f"({model.num_params():,} parameters, {dtype}, {size:.1f} MiB"
        f"{', with its chat template' if chat is not None else ''}).\n"
        f"run it with llama.cpp: llama-cli -m {file}   (or Ollama: FROM {file} in a Modelfile)"
    )
    return file
