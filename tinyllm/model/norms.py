"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama).

Both normalise each token's feature vector independently. LayerNorm removes the mean and divides
by the standard deviation, then applies a learned scale and (optionally) shift. RMSNorm skips
the mean and the shift: it only divides by the root mean square, which is cheaper and works as
well in practice (Zhang & Sennrich, 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm always has one)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. Never has a bias (the `bias` flag is ignored)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the usual case (fp32 residual stream): one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32 (a mean of squares overflows in fp16), then scale
        # in the input dtype, exactly as Llama does.
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


# name -> class; the keys are the file names in conf/norm/.
NORMS: dict[str, type[nn.Module]] = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
}
