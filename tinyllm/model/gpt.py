"""The GPT: token embedding -> n_layer x Block -> final norm -> logits.

    idx (B, T) --wte--> x (B, T, C) --+pos--> [Block]*n_layer --ln_f--> lm_head --> (B, T, V)

A Block is the pre-norm residual pair (GPT-2, Llama):
    x = x + attn(norm_1(x))
    x = x + mlp(norm_2(x))
Every part is looked up by name from a registry (norms.NORMS, mlp.ACTIVATIONS,
positions.POSITIONS), so `norm=rmsnorm activation=swiglu pos=rope` builds a Llama-style model
from the same code. Module names follow nanoGPT (transformer.wte, h.0.attn.c_attn, ...).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinyllm.model.attention import CausalSelfAttention, KVCache
from tinyllm.model.config import ModelConfig
from tinyllm.model.mlp import ACTIVATIONS
from tinyllm.model.norms import NORMS
from tinyllm.model.positions import POSITIONS
from tinyllm.model.registry import lookup


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        norm_cls = lookup(NORMS, config.norm, "norm")
        self.post_norm = config.post_norm
        self.ln_1 = norm_cls(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm_cls(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = lookup(ACTIVATIONS, config.activation, "activation")(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        return_attn: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.post_norm:
            # The original transformer: normalise after the residual add. Gradients to early
            # layers pass through every norm, which is why it needs warmup and is rarely used.
            a, attn = self.attn(x, rope, mask, kv_cache, return_attn)
            x = self.ln_1(x + a)
            return self.ln_2(x + self.mlp(x)), attn
        # Pre-norm: the residual stream x is never normalised, only each branch's input.
        a, attn = self.attn(self.ln_1(x), rope, mask, kv_cache, return_attn)
        x = x + a
        return x + self.mlp(self.ln_2(x)), attn


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()  # bad combinations fail here, before any training time is spent
        self.config = config
        pos_cls = lookup(POSITIONS, config.pos, "pos")  # every bad name fails before any weight
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                # Post-norm blocks already end in a norm; pre-norm needs one before the head.
                ln_f=nn.Identity()
                if config.post_norm
                else lookup(NORMS, config.norm, "norm")(
                    config.n_embd, eps=config.norm_eps, bias=config.bias
                ),
            )
        )
        self.pos = pos_cls(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix both embeds tokens and scores them (Press & Wolf, 2017): fewer params.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth (2 adds/layer).
        # zero_init_proj (modded-nanogpt): start them at zero instead, so every block begins as
        # the identity and the stream is the embedding alone; their gradients are not zero
        # (the branch's input is not), so they move from the first step.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    std = config.init_std / math.sqrt(2 * config.n_layer)
                    nn.init.normal_(p, mean=0.0, std=std)
        # A training choice, not part of the architecture (so not in config or checkpoints):
        # recompute each Block's activations in backward instead of storing them
        # (trainer.activation_checkpointing; about one layer's activations kept, +1 forward).
        self.activation_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """idx (B, T) token ids -> logits (B, T, vocab_size) [, attention weights per layer].

        With a kv_cache, idx holds only the new tokens: they sit at positions
        kv_cache.seq_len .. seq_len + T - 1, and the cache is advanced by T in place.
        """
        B, T = idx.shape
        start = 0
        if kv_cache is not None:
            kv_cache.check(B, T)
            start = kv_cache.seq_len
        x = self.transformer.wte(idx)  # (B, T, C)
        x = self.pos.embed(x, start)
        if self.training and self.config.dropout > 0:  # no nn.Dropout call when off (decode)
            x = F.dropout(x, self.config.dropout)
        rope = self.pos.rope(start, T)
        mask = self._attn_mask(start, T, x)

        attns = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            args = (x, rope, mask, kv_cache, return_attn)
            x, attn = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            if return_attn:
                attns.append(attn)
        if kv_cache is not None:
            kv_cache.seq_len = start + T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:
            # Smoothly bound the logits to (-cap, cap) (Gemma 2): tanh is ~linear near zero.
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return (logits, attns) if return_attn else logits

    def _attn_mask(self, start: int, T: int, x: torch.Tensor) -> torch.Tensor | None:
        """The mask shared by all layers, or None for plain causal attention (the fast path)."""
        bias = self.pos.attn_bias(start, T)  # ALiBi: (H, T, start+T), causal -inf included
        if bias is not None:
            return bias.to(x.dtype)
        if start == 0 or T == 1:
            return None  # no cache (is_causal), or one new token that may see every key
        # Chunked prefill into a non-empty cache: query i (position start+i) sees keys <= it.
        return torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)

    # ------------------------------------------------------------------------- inference

    def init_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A preallocated KV cache for `batch_size` sequences of up to max_seq_len tokens
        (default block_size), on the model's device and in its dtype unless given; inside an
        autocast region, in the autocast dtype (what the keys and values are computed in)."""
        p = self.transformer.wte.weight
        device = torch.device(device) if device is not None else p.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else p.dtype
        return KVCache(
            n_layer=self.config.n_layer,
            batch_size=batch_size,
            n_kv_head=self.config.kv_heads,
            max_seq_len=max_seq_len or self.config.block_size,
            head_dim=self.config.head_dim,
            device=device,
            dtype=dtype,
        )

    # ---------------------------------------------------------------------- bookkeeping

    def _is_embedding(self, name: str) -> bool:
        return name in ("transformer.wte.weight", "pos.wpe.weight")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding drops the token and position
        embeddings (Kaplan et al.'s N); a tied lm_head is then dropped too, an untied one kept."""
        return sum(
            p.numel()
            for n, p in self.named_parameters()
            if not (non_embedding and self._is_embedding(n))
        )

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) at full context, for MFU:
        6 * (params in matmuls) + 12 * n_layer * n_embd * block_size (the attention scores),
        as in the PaLM paper / nanoGPT's estimate_mfu."""
        c = self.config
        matmul_params = self.num_params(non_embedding=True)
        if c.tie_weights:
            matmul_params += c.vocab_size * c.n_embd  # the shared matrix is also the lm_head
        return 6.0 * matmul_params + 12.0 * c.n_layer * c.n_embd * c.block_size

    def param_groups(
        self, weight_decay: float, decay_embeddings: bool = False
    ) -> list[dict[str, Any]]:
        """Optimizer groups: weight matrices decay; norms, biases and (by default) embeddings
        don't (decay would pull a norm's gain or a rare token's embedding towards zero)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.dim() >= 2 and (decay_embeddings or not self._is_embedding(name))
            (decay if is_matrix else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
