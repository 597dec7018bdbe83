"""Which standard architecture a ModelConfig is: Llama or GPT-2 (or neither, said clearly).

Shared by the Hugging Face export (export.py) and the GGUF export (export_gguf.py): both
formats know exactly these two families, so both refuse the same models with the same words.
"""

from __future__ import annotations

import torch

from tinyllm.errors import TinyLLMError
from tinyllm.model import ModelConfig

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
