"""The hand-written GPT and its swappable parts (see gpt.py for the big picture)."""

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
