"""The hand-written GPT and its swappable parts.

Reading order: config.py (every choice as a plain value) -> norms.py -> mlp.py (incl. the 2/3
rule of gated MLPs) -> positions.py (learned, sinusoidal, rope, alibi, none) -> attention.py
(MHA/GQA/MQA, SDPA vs manual, the KV cache) -> gpt.py (the block and the whole model).
"""

from __future__ import annotations

from tinyllm.model.attention import CausalSelfAttention, KVCache
from tinyllm.model.config import ModelConfig
from tinyllm.model.gpt import GPT, Block
from tinyllm.model.mlp import ACTIVATIONS
from tinyllm.model.norms import NORMS
from tinyllm.model.positions import POSITIONS

__all__ = [
    "ACTIVATIONS",
    "GPT",
    "NORMS",
    "POSITIONS",
    "Block",
    "CausalSelfAttention",
    "KVCache",
    "ModelConfig",
]
