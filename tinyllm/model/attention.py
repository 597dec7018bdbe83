"""Causal self-attention (multi-head, grouped-query, multi-query) and the KV cache.

Each of n_head query heads attends over keys/values; with n_kv_head < n_head, groups of
n_head / n_kv_head query heads share one key/value head (GQA; n_kv_head = 1 is MQA). That
shrinks the KV cache by the same factor, which is what makes decoding cheap.

Two implementations of the same maths:
- sdpa: torch's fused scaled_dot_product_attention (FlashAttention on GPU); never materialises
  the (T, T) score matrix, so it cannot return the attention weights.
- manual: softmax(q k^T / sqrt(d) + mask) v written out, for reading and for attention maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.errors import TinyLLMError
from tinyllm.model.config import ModelConfig
from tinyllm.model.norms import NORMS
from tinyllm.model.positions import apply_rope
from tinyllm.model.registry import lookup


class KVCache:
    """Preallocated keys/values of every layer, written in place as tokens are decoded.

    k, v: (n_layer, B, n_kv_head, max_seq_len, head_dim). `seq_len` is how many positions are
    filled; the model's forward writes the new tokens at [seq_len, seq_len + T) and then
    advances it. Preallocation means no torch.cat (and no reallocation) per decoded token.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Per-layer views made once, so a decode step only slices (no per-step indexing op).
        # (Not unbind(): its views cannot be written in place under autograd.)
        self.k_layers = [self.k[i] for i in range(n_layer)]
        self.v_layers = [self.v[i] for i in range(n_layer)]
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.seq_len = 0

    def reset(self) -> None:
        """Forget everything (the buffers are reused, not freed)."""
        self.seq_len = 0

    def crop(self, n: int) -> None:
        """Keep only the first n positions (e.g. to rewind after a rejected draft)."""
        self.seq_len = max(0, min(self.seq_len, n))

    def check(self, B: int, T: int) -> None:
        if self.batch_size != B:
            raise TinyLLMError(
                f"KV cache was made for batch size {self.batch_size} but got a batch of {B}. "
                "Create it with model.init_kv_cache(batch_size=<your batch size>)."
            )
        if self.seq_len + T > self.max_seq_len:
            raise TinyLLMError(
                f"KV cache is full: {self.seq_len} + {T} new tokens > max_seq_len="
                f"{self.max_seq_len}. Create it with a larger max_seq_len, or crop/reset it."
            )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, D) at the current position; return all keys/values so far."""
        start, end = self.seq_len, self.seq_len + k.size(2)
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]  # 2 x (B, n_kv, max_T, D)
        k_all[:, :, start:end] = k
        v_all[:, :, start:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]  # 2 x (B, n_kv, end, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.impl = config.attn_impl
        self.dropout = config.dropout  # attention-weight and residual dropout probability
        # q, k and v in one matmul: output is [q (n_head*D) | k (n_kv*D) | v (n_kv*D)].
        n_qkv = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, n_qkv, bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        # qk-norm: normalise each query/key head before the dot product, which bounds the
        # attention logits and stabilises training at high learning rates (Dehghani et al.).
        if config.qk_norm:
            norm_cls = lookup(NORMS, config.norm, "norm")
            self.q_norm = norm_cls(self.head_dim, eps=config.norm_eps, bias=config.bias)
            self.k_norm = norm_cls(self.head_dim, eps=config.norm_eps, bias=config.bias)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_attn: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), attention weights (B, H, T, Tk) or None).

        `mask` is None for plain causal attention over x alone, else a boolean (True = may
        attend) or additive float mask broadcastable to (B, H, T, Tk) (cached decoding, ALiBi).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, H + 2 * Hkv, D)  # heads: [q (H) | k (Hkv) | v (Hkv)]
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)  # (B, T, H + Hkv, D), (B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)  # (B, T, H + Hkv, D)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated together: one op, not two
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # 2 x (B, Hkv, Tk, D), Tk >= T

        attn = None
        if return_attn or self.impl == "manual":
            y, attn = self._manual(q, k, v, mask)
        else:
            y = _sdpa(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                # Only "causal" when queries and keys are the same T tokens (no cache, no mask).
                is_causal=mask is None and q.size(2) == k.size(2) and q.size(2) > 1,
                enable_gqa=Hkv != H,
            )
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, C)
        y = self.c_proj(y)
        if self.training and self.dropout > 0:  # a branch, not an nn.Dropout: no call when off
            y = F.dropout(y, self.dropout)
        return y, attn

    def _manual(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_kv_head != self.n_head:
            # Each kv head serves n_head / n_kv_head consecutive query heads.
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
        T, Tk = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, Tk)
        if mask is None:
            # Plain causal: query i (at absolute position Tk - T + i) sees keys <= its position.
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        if mask.dtype == torch.bool:
            att = att.masked_fill(~mask, float("-inf"))
        else:
            att = att + mask
        att = F.softmax(att.float(), dim=-1).type_as(q)
        y = F.dropout(att, self.dropout, self.training) @ v  # (B, H, T, Tk) @ (B, H, Tk, D)
        return y, att


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention, with bf16 training on CPU done in fp32.

    torch's CPU flash-attention *backward* runs ~8x slower in bf16 than in fp32 (torch 2.13
    on a Xeon with AMX: 11.0 vs 1.4 ms a call at the micro model, batch 32), which cancels
    everything bf16-mixed gains on the matrix products around it (benchmarks/README.md,
    "bf16 on a CPU with AMX"). So when a CPU bf16 attention needs gradients, the attention
    itself runs in fp32 (three casts of (B, H, T, D) tensors) and its output goes back to
    bf16; the projections before and after stay in bf16. Inference keeps the bf16 kernel,
    whose forward is as fast as fp32's. "bf16" means any input in bf16 (bf16-true, or
    bf16-mixed) or CPU autocast to bf16: under qk_norm with RMSNorm, q and k come back in
    fp32 and only v is bf16, and autocast would still pick the bf16 kernel.
    """
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not _cpu_bf16(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):  # (autocast would cast the inputs back)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return y.to(torch.bfloat16)


def _cpu_bf16(*xs: torch.Tensor) -> bool:
    """Whether attention over xs would run in bf16 on the CPU (a bf16 input, or autocast)."""
    if any(x.dtype == torch.bfloat16 for x in xs):
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
