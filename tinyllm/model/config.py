"""ModelConfig: every architectural choice of the GPT, as plain values.

The config is a dataclass of primitives so it can live in a checkpoint's hyper-parameters and
be rebuilt without the conf/ tree. The names of `norm`, `activation` and `pos` are registry
keys (and, by the same name, files in conf/norm, conf/activation and conf/pos).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    n_embd: int = 128
    # swappable parts (registry keys)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    post_norm: bool = False  # True: the original post-norm transformer (for ablations)
    activation: str = "gelu"  # gelu | relu | silu | swiglu | geglu
    mlp_hidden: int | None = None  # None -> 4*n_embd, or 2/3 of that (rounded) for gated MLPs
    mlp_multiple_of: int = 16  # round the hidden size of gated MLPs up to this multiple
    pos: str = "learned"  # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    # attention
    attn_impl: str = "sdpa"  # sdpa (flash on GPU) | manual (can return attention weights)
    qk_norm: bool = False
    # regularisation, init, head
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    init_std: float = 0.02
    z_loss: float = 0.0  # weight of the z-loss (log^2 of the softmax normaliser); 0 = off
    logit_softcap: float | None = None  # tanh soft-capping of the logits; None = off
    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible free slot

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, with a clear error for unknown keys (e.g. a typo in a YAML)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"Unknown model option(s) {unknown}. Valid options are: {sorted(names)}. "
                "Fix the model config (conf/model/*.yaml or a `model.<name>=` override)."
            )
        return cls(**dict(d))
