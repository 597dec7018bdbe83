"""ModelConfig: every architectural choice of the GPT, as plain values.

The config is a dataclass of primitives so it can live in a checkpoint's hyper-parameters and
be rebuilt without the conf/ tree. The names of `norm`, `activation` and `pos` are registry
keys (and, by the same name, files in conf/norm, conf/activation and conf/pos).

This module is a leaf: it imports no part of the model. Whether a name is a known norm (or
activation, or position) is answered where the part is built, by `registry.lookup`, and what a
part needs of the other values (rope: an even head_dim) by the part itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tinyllm.errors import TinyLLMError


def config_error(option: str, problem: str, fix: str) -> TinyLLMError:
    """The error for a bad model option: which one, what is wrong, how to fix it."""
    return TinyLLMError(
        f"Invalid model.{option}: {problem}. {fix} (conf/model/*.yaml "
        f"or a `model.{option}=` override)."
    )


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
    activation: str = "gelu"  # gelu | relu | relu2 | silu | swiglu | geglu
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
    zero_init_proj: bool = False  # start every residual-branch output projection at zero
    z_loss: float = 0.0  # weight of the z-loss (log^2 of the softmax normaliser); 0 = off
    logit_softcap: float | None = None  # tanh soft-capping of the logits; None = off

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise TinyLLMError for a bad combination of plain values (names are checked by
        the builders through registry.lookup), before any training time is spent."""
        if self.attn_impl not in ("sdpa", "manual"):
            raise config_error("attn_impl", f"got {self.attn_impl!r}", "Use `sdpa` or `manual`")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config_error(name, f"got {getattr(self, name)!r}", "Use a positive integer")
        if self.n_embd % self.n_head:
            raise config_error(
                "n_embd",
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}, so the heads "
                "cannot split the embedding evenly",
                f"Pick a multiple of n_head, e.g. {self.n_embd // self.n_head * self.n_head}",
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise config_error(
                "n_kv_head",
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; each "
                "key/value head must serve the same number of query heads",
                "Use a divisor of n_head (n_kv_head=1 is multi-query, =n_head is multi-head)",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise config_error("dropout", f"got {self.dropout}", "Use a value in [0, 1)")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise config_error(
                "logit_softcap", f"got {self.logit_softcap}", "Use a positive number or null"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise config_error(
                "mlp_hidden", f"got {self.mlp_hidden}", "Use a positive integer or null"
            )
        if self.mlp_multiple_of < 1:
            raise config_error(
                "mlp_multiple_of", f"got {self.mlp_multiple_of}", "Use a positive integer"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, with a clear error for unknown keys (e.g. a typo in a YAML)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if d.get("extra") in ({}, None):  # an unused slot that older checkpoints still carry
            d.pop("extra", None)
        unknown = sorted(set(d) - names)
        if unknown:
            raise TinyLLMError(
                f"Unknown model option(s) {unknown}. Valid options are: {sorted(names)}. "
                "Fix the model config (conf/model/*.yaml or a `model.<name>=` override)."
            )
        return cls(**dict(d))
