"""Export a tinyllm model to a Hugging Face directory (Llama or GPT-2 layout).

    python -m tinyllm.export ckpt=PATH out=DIR [dtype=float32|bfloat16|float16]   (contract)
    python -m tinyllm.export ckpt=PATH out=FILE.gguf format=gguf [dtype=f32|f16|q8_0]
                                                      (contract; the writer is export_gguf.py)

writes DIR/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json}, which `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
and runs with the same logits as ours. Two architectures have a standard equivalent:

- Llama:  pos=rope + norm=rmsnorm + activation=swiglu (any n_kv_head; bias on or off).
  Our rope uses the same half-split layout as HF's `rotate_half`, so q/k need no permutation.
- GPT-2:  pos=learned + norm=layernorm + activation=gelu, n_kv_head = n_head. HF's GPT-2 uses
  Conv1D (weight stored as (in, out)), so our Linear weights are transposed; our GELU is the
  exact erf form, written as `activation_function: gelu` (not GPT-2's tanh `gelu_new`).

Anything else (alibi, qk-norm, post-norm, soft-capping, ...) is refused with a message naming
the part that has no standard equivalent. `export_hf(model, tokenizer, out_dir)` is the pure
conversion, usable on a model in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.families import hf_family, llama_tensors
from tinyllm.io import atomic_write, unwrap_compiled, write_text_atomic
from tinyllm.model import GPT
from tinyllm.tokenizer.hf import save_hf

__all__ = ["export_hf", "hf_family", "run"]


def _llama(model: GPT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = model.config
    hidden = model.transformer.h[0].mlp.hidden
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_theta": c.rope_theta,
        "attention_bias": c.bias,
        "mlp_bias": c.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_weights,
        "initializer_range": c.init_std,
    }
    out = {_HF_LLAMA[r].format(i=i, kind=kind): t for r, i, kind, t in llama_tensors(model)}
    return cfg, out


# Hugging Face's Llama names for the roles of families.llama_tensors
_HF_LLAMA = {
    "embed": "model.embed_tokens.{kind}",
    "attn_norm": "model.layers.{i}.input_layernorm.{kind}",
    "q": "model.layers.{i}.self_attn.q_proj.{kind}",
    "k": "model.layers.{i}.self_attn.k_proj.{kind}",
    "v": "model.layers.{i}.self_attn.v_proj.{kind}",
    "o": "model.layers.{i}.self_attn.o_proj.{kind}",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.{kind}",
    "gate": "model.layers.{i}.mlp.gate_proj.{kind}",
    "up": "model.layers.{i}.mlp.up_proj.{kind}",
    "down": "model.layers.{i}.mlp.down_proj.{kind}",
    "final_norm": "model.norm.{kind}",
    "head": "lm_head.{kind}",
}


def _gpt2(model: GPT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = model.config
    sd = model.state_dict()
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": model.transformer.h[0].mlp.hidden,
        "activation_function": "gelu",  # exact erf GELU, as ours (GPT-2's own is gelu_new)
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_weights,
        "initializer_range": c.init_std,
    }

    def bias(key: str, size: int) -> torch.Tensor:
        # HF's GPT-2 always has biases; a model trained with bias=false exports zeros.
        return sd[key] if key in sd else torch.zeros(size)

    C = c.n_embd
    out = {"transformer.wte.weight": sd["transformer.wte.weight"]}
    out["transformer.wpe.weight"] = sd["pos.wpe.weight"]
    for i in range(c.n_layer):
        ours, hf = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[hf + f"{ln}.weight"] = sd[ours + f"{ln}.weight"]
            out[hf + f"{ln}.bias"] = bias(ours + f"{ln}.bias", C)
        # Conv1D stores weights as (in, out): the transpose of nn.Linear's (out, in).
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = sd[ours + f"{name}.weight"]
            out[hf + f"{name}.weight"] = w.t()
            out[hf + f"{name}.bias"] = bias(ours + f"{name}.bias", w.size(0))
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = bias("transformer.ln_f.bias", C)
    if not c.tie_weights:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return cfg, out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def export_hf(
    model: GPT,
    tokenizer: Any | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` (and `tokenizer`, a BPETokenizer, if given) as a Hugging Face directory.

    Returns the directory. Raises TinyLLMError (before writing anything) for architectures
    without a standard equivalent.
    """
    from safetensors.torch import save_file

    model = unwrap_compiled(model)  # a torch.compile'd model exports its module
    family = hf_family(model.config)
    cfg, tensors = (_llama if family == "llama" else _gpt2)(model)
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy.
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in tensors.items()}
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    cfg.update(special)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "model.safetensors",
        lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    )
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {k: v for k, v in special.items() if v is not None})
    if tokenizer is not None:
        save_hf(tokenizer, out / "tokenizer.json")
        id_to_tok = {i: s for s, i in tokenizer.special_tokens.items()}
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.config.block_size,
            "clean_up_tokenization_spaces": False,
        }
        for role in ("bos", "eos", "pad"):
            tid = getattr(tokenizer, f"{role}_id")
            if tid is not None and tid in id_to_tok:
                tok_cfg[f"{role}_token"] = id_to_tok[tid]
        _write_json(out / "tokenizer_config.json", tok_cfg)
    return out


# ------------------------------------------------------------------------------ CLI

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("auto", "hf", "gguf")


def run(ckpt: str, out: str, dtype: str | None = None, format: str = "auto") -> Path:
    from tinyllm import load_checkpoint
    from tinyllm.checkpoint import resolve_ckpt

    if not ckpt or not out:
        raise TinyLLMError(
            "tinyllm.export needs both `ckpt=PATH` (a .ckpt, a run directory or `latest`) and "
            "`out=DIR` (the Hugging Face directory to write) or `out=FILE.gguf format=gguf`, "
            "e.g. `python -m tinyllm.export ckpt=latest out=exported/my-model`."
        )
    if format not in FORMATS:
        raise TinyLLMError(f"Unknown format={format!r} for tinyllm.export. Valid: hf, gguf.")
    if format == "gguf" or (format == "auto" and str(out).endswith(".gguf")):
        from tinyllm.export_gguf import run_gguf

        return run_gguf(ckpt, out, dtype or "f32")
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise TinyLLMError(
            f"Unknown dtype={dtype!r} for tinyllm.export. Valid: {', '.join(_DTYPES)}."
        )
    path = resolve_ckpt(ckpt)
    model, tokenizer = load_checkpoint(str(path))
    family = hf_family(model.config)  # refuse before anything is written
    out_dir = export_hf(model, tokenizer, out, dtype=_DTYPES[dtype])
    name = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    print(
        f"exported {path} -> {out_dir}/ as {name} ({model.num_params():,} parameters, {dtype}).\n"
        + load_hint(out_dir)
    )
    return out_dir


def load_hint(out_dir: str | Path) -> str:
    """How to load the export; says how to install transformers where it is missing."""
    import importlib.util

    line = f"load it with: AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
    if importlib.util.find_spec("transformers") is None:
        line += " (transformers is not installed here: pip install -e '.[hf]')"
    return line


def _hydra_main() -> None:

    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf", config_name="export", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        with exit_on_user_error():
            run(cfg.ckpt, cfg.out, cfg.dtype, cfg.get("format", "auto"))

    main()


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(_hydra_main, "export")
