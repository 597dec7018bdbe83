"""The feed-forward (MLP) half of each block, one class per `model.activation`.

Ungated (GPT-2):   y = W2 act(W1 x)                 two matrices, hidden = 4 * n_embd
Gated (GLU, Llama): y = W2 (act(W_gate x) * W_up x)  three matrices

The 2/3 rule: a gated MLP has three matrices instead of two, so to keep the parameter count
(and FLOPs) matched to the ungated MLP its hidden size is shrunk to 2/3 of 4 * n_embd, rounded
up to a multiple of `mlp_multiple_of` (matmuls are faster on round sizes):
    2 * n_embd * (4 * n_embd)  ==  3 * n_embd * (2/3 * 4 * n_embd)
This is what Shazeer (2020) "GLU Variants Improve Transformer" and Llama do. Set
`model.mlp_hidden` to choose the hidden size yourself (then no rule is applied).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.model.config import ModelConfig


def mlp_hidden_size(config: ModelConfig, gated: bool) -> int:
    """The hidden width: `mlp_hidden` if set, else 4*n_embd (ungated) or the 2/3 rule (gated)."""
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    hidden = 4 * config.n_embd
    if gated:
        m = config.mlp_multiple_of
        hidden = m * math.ceil(2 * hidden / 3 / m)
    return hidden


class MLP(nn.Module):
    """act(x W1) W2. Subclasses pick the activation; gated subclasses set `gated = True`."""

    gated: bool = False
    act: Callable[[torch.Tensor], torch.Tensor] = staticmethod(F.gelu)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = mlp_hidden_size(config, self.gated)
        # Gated MLPs fuse W_gate and W_up into one matmul: c_fc outputs [gate | up].
        n_out = 2 * self.hidden if self.gated else self.hidden
        self.c_fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2*hidden) when gated
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # 2 x (B, T, hidden)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        h = self.c_proj(h)  # (B, T, C)
        if self.training and self.dropout > 0:  # a branch, not an nn.Dropout: no call when off
            h = F.dropout(h, self.dropout)
        return h


class GeluMLP(MLP):
    """GPT-2's MLP. Exact (erf) GELU, like nanoGPT and torch.nn.GELU()."""

    act = staticmethod(F.gelu)


class ReluMLP(MLP):
    """The original transformer's MLP (Vaswani et al., 2017)."""

    act = staticmethod(F.relu)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al., 2021, "Primer"; modded-nanogpt's MLP)."""
    return F.relu(x).square()


class Relu2MLP(MLP):
    """ReLU squared: sparse like ReLU, smooth at zero like GELU, no exp/erf to compute."""

    act = staticmethod(relu_squared)


class SiluMLP(MLP):
    """SiLU (a.k.a. swish): x * sigmoid(x)."""

    act = staticmethod(F.silu)


class SwiGLU(MLP):
    """Llama's MLP: silu(x W_gate) * (x W_up), then W_down."""

    gated = True
    act = staticmethod(F.silu)


class GeGLU(MLP):
    """gelu(x W_gate) * (x W_up), then W_down (Shazeer, 2020)."""

    gated = True
    act = staticmethod(F.gelu)


# name -> class; the keys are the file names in conf/activation/.
ACTIVATIONS: dict[str, type[MLP]] = {
    "gelu": GeluMLP,
    "relu": ReluMLP,
    "relu2": Relu2MLP,
    "silu": SiluMLP,
    "swiglu": SwiGLU,
    "geglu": GeGLU,
}
