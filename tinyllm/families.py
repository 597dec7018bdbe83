"""Which standard architecture a ModelConfig is: Llama or GPT-2 (or neither, said clearly).

Shared by the Hugging Face export (export.py) and the GGUF export (export_gguf.py): both
formats know exactly these two families, so both refuse the same models with the same words.
"""

from __future__ import annotations

import torch

from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT, ModelConfig

# What each family requires: option -> (required value, how to say it).
_LLAMA = {"pos": "rope", "norm": "rmsnorm", "activation": "swiglu"}
_GPT2 = {"pos": "learned", "norm": "layernorm", "activation": "gelu"}


def _mismatches(c: ModelConfig, family: str) -> list[str]:
    """The parts of `c` that the HF family cannot represent, as `option=value` phrases."""
    need = _LLAMA if family == "llama" else _GPT2
    bad = [f"{k}={getattr(c, k)} (needs {v})" for k, v in need.items() if getattr(c, k) != v]
    if family == "gpt2" and c.kv_heads != c.n_head:
        bad.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
    if c.qk_norm:
        bad.append("qk_norm=true (no qk-norm in this architecture)")
    if c.post_norm:
        bad.append("post_norm=true (both are pre-norm)")
    if c.logit_softcap is not None:
        bad.append(f"logit_softcap={c.logit_softcap} (no logit soft-capping)")
    return bad


def hf_family(config: ModelConfig, target: str = "Hugging Face format") -> str:
    """ "llama" or "gpt2", or a TinyLLMError naming the parts without a standard equivalent."""
    misses = {f: _mismatches(config, f) for f in ("llama", "gpt2")}
    for family, bad in misses.items():
        if not bad:
            return family
    # Explain against the closer family: that is the one the user most likely meant.
    family = min(misses, key=lambda f: len(misses[f]))
    name = {"llama": "Llama", "gpt2": "GPT-2"}[family]
    raise TinyLLMError(
        f"Cannot export this model to {target}: it is closest to {name}, but "
        f"{'; '.join(misses[family])} has no standard equivalent there. Exportable models are "
        "Llama (pos=rope norm=rmsnorm activation=swiglu, any n_kv_head) and GPT-2 "
        "(pos=learned norm=layernorm activation=gelu, n_kv_head=n_head), without qk_norm, "
        "post_norm or logit_softcap. Train with those options to export, or use the tinyllm "
        "checkpoint directly (tinyllm.load_checkpoint)."
    )


def split_qkv(c: ModelConfig, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Our fused c_attn rows are [q (H*D) | k (Hkv*D) | v (Hkv*D)]; works for weight and bias."""
    D = c.head_dim
    return t.split([c.n_head * D, c.kv_heads * D, c.kv_heads * D], dim=0)


def llama_tensors(model: GPT) -> list[tuple[str, int | None, str, torch.Tensor]]:
    """A Llama-family GPT's tensors cut the way Llama keeps them, named by role.

    Each entry is (role, layer or None, "weight" | "bias", tensor), in the order both exports
    write them. Roles: embed, attn_norm, q, k, v, o, ffn_norm, gate, up, down (per layer),
    final_norm, and head (only when the head is untied). Each export maps the roles to its
    own names (export.py: Hugging Face; export_gguf.py: llama.cpp, which also permutes q, k).
    """
    c, sd = model.config, model.state_dict()
    hidden = model.transformer.h[0].mlp.hidden
    out: list[tuple[str, int | None, str, torch.Tensor]] = [
        ("embed", None, "weight", sd["transformer.wte.weight"])
    ]
    kinds = ("weight", "bias") if c.bias else ("weight",)
    for i in range(c.n_layer):
        ours = f"transformer.h.{i}."
        out.append(("attn_norm", i, "weight", sd[ours + "ln_1.weight"]))
        out.append(("ffn_norm", i, "weight", sd[ours + "ln_2.weight"]))
        for kind in kinds:
            q, k, v = split_qkv(c, sd[ours + f"attn.c_attn.{kind}"])
            gate, up = sd[ours + f"mlp.c_fc.{kind}"].split(hidden, dim=0)  # rows [gate | up]
            out += [
                ("q", i, kind, q),
                ("k", i, kind, k),
                ("v", i, kind, v),
                ("o", i, kind, sd[ours + f"attn.c_proj.{kind}"]),
                ("gate", i, kind, gate),
                ("up", i, kind, up),
                ("down", i, kind, sd[ours + f"mlp.c_proj.{kind}"]),
            ]
    out.append(("final_norm", None, "weight", sd["transformer.ln_f.weight"]))
    if not c.tie_weights:  # tied: both formats reuse the embedding as the output matrix
        out.append(("head", None, "weight", sd["lm_head.weight"]))
    return out
