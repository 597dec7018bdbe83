"""Positional information, one class per `model.pos`.

Attention by itself is blind to order (it sees a set of tokens), so position must enter
somewhere. The four classic places:

- learned, sinusoidal: a vector per position is *added to the token embeddings* (GPT-2, and the
  original transformer). They only know positions < block_size.
- rope: queries and keys are *rotated* by an angle proportional to their position, so q.k
  depends only on the relative distance (Su et al., 2021; Llama).
- alibi: a *bias on the attention scores*, -slope_h * distance, one slope per head
  (Press et al., 2021). No parameters; extrapolates to longer sequences.
- none (NoPE): nothing at all. The causal mask alone leaks enough order for a decoder to learn
  positions (Haviv et al., 2022).

Every class answers the same three questions, so the model never branches on a name:
`embed(x, start)` (added to the input), `rope(start, T)` (cos/sin for q and k) and
`attn_bias(start, T)` (added to the scores). `start` is the position of the first token (> 0
when decoding with a KV cache).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinyllm.errors import TinyLLMError
from tinyllm.model.config import ModelConfig, config_error


class Position(nn.Module):
    """Base class: no positional information (also the `none` choice)."""

    # The longest sequence the encoding can represent; None = unbounded (relative encodings).
    # Decoding asks this, not the name: a bounded encoding cannot reach back past max_len.
    max_len: int | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.name = config.pos

    def check_length(self, end: int) -> None:
        if self.max_len is not None and end > self.max_len:
            raise TinyLLMError(
                f"Sequence of {end} tokens is longer than model.block_size={self.max_len}, the "
                f"most that `pos={self.name}` positions can encode. Feed at most block_size "
                "tokens (crop the prompt / context window), or train with a larger "
                "model.block_size or a relative encoding (pos=rope, pos=alibi, pos=none)."
            )

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x

    def rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def attn_bias(self, start: int, T: int) -> torch.Tensor | None:
        return None


class NoPosition(Position):
    """NoPE: the causal mask is the only source of order."""


class LearnedPosition(Position):
    """GPT-2: a trained vector per position, added to the token embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_len = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.size(1)
        self.check_length(start + T)
        # Rows start..start+T-1 of the table: the same as self.wpe(arange), without creating
        # a position tensor every decode step.
        return x + self.wpe.weight[start : start + T]  # (B, T, C) + (T, C)


class SinusoidalPosition(Position):
    """The original transformer: fixed sin/cos waves of geometrically spaced wavelengths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_len = config.block_size
        C = config.n_embd
        pos = torch.arange(config.block_size, dtype=torch.float32)[:, None]  # (T, 1)
        freq = torch.exp(torch.arange(0, C, 2, dtype=torch.float32) * (-math.log(10000.0) / C))
        pe = torch.zeros(config.block_size, C)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : C // 2]
        # Scale to the token embeddings' init: sin/cos have RMS 1/sqrt(2), token embeddings
        # std init_std (0.02). Added at unit amplitude, the waves would drown the tokens ~35:1
        # and the model must first learn to grow its embeddings (the original transformer
        # instead multiplies the embeddings by sqrt(n_embd)). At RMS init_std the positions
        # enter at the scale a learned position table starts from.
        pe = pe * (config.init_std * math.sqrt(2.0))
        # Not persistent: it is a pure function of the config, so checkpoints don't carry it.
        self.register_buffer("pe", pe, persistent=False)

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.size(1)
        self.check_length(start + T)
        return x + self.pe[start : start + T].to(x.dtype)  # (B, T, C) + (T, C)


class RotaryPosition(Position):
    """RoPE in the "half-split" layout used by Llama / Hugging Face (`rotate_half`).

    Feature i of a head is paired with feature i + head_dim/2 and the pair is rotated by the
    angle pos * theta^(-2i/head_dim). (The paper pairs neighbours 2i, 2i+1; it is the same
    thing up to a fixed permutation of the q/k weights, and this layout exports to Llama as is.)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.head_dim % 2:
            raise config_error(
                "pos",
                f"rope rotates pairs of features but head_dim = n_embd/n_head = "
                f"{config.n_embd}/{config.n_head} = {config.head_dim} is odd",
                "Choose n_embd and n_head so that n_embd/n_head is even, or another pos",
            )
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self._build(config.block_size)

    def _build(self, n: int, device: torch.device | None = None) -> None:
        # cos/sin tables computed once (not per step), in fp32, non-persistent buffers. Stored
        # full width, (n, D), in the form apply_rope consumes, so a step only slices them:
        #   cos = [cos | cos],  sin = [-sin | sin]   (each half is D/2 wide)
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)  # (n, D/2)
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos", torch.cat((cos, cos), -1).to(device), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), -1).to(device), persistent=False)

    def rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + T > self.cos.size(0):  # longer than ever seen: grow the table (rare)
            self._build(max(start + T, 2 * self.cos.size(0)), device=self.cos.device)
        # (T, 1, D): broadcasts over the heads of a (B, T, n_heads, D) tensor.
        return self.cos[start : start + T, None], self.sin[start : start + T, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, n_heads, D) by the tables (T, 1, D) of RotaryPosition.rope.

    Half-split layout: feature i pairs with i + D/2, and each pair (x1, x2) becomes
    (x1 cos - x2 sin, x2 cos + x1 sin). With x_swapped = [x2 | x1] (a roll by D/2) and the
    tables [cos | cos], [-sin | sin] that is one expression for all D features, so q and k
    heads are rotated together in three ops (Llama's rotate_half, with the sign in the table).
    """
    if cos.dtype != x.dtype:  # e.g. bf16 q/k under autocast (the tables stay fp32)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)  # (B, T, n_heads, D)


def alibi_slopes(n_head: int) -> list[float]:
    """The geometric slopes from the ALiBi paper (its reference code, incl. non-powers of 2)."""

    def pow2(n: int) -> list[float]:
        first = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [first * first**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return pow2(n_head)
    closest = 2 ** math.floor(math.log2(n_head))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: n_head - closest]


class ALiBiPosition(Position):
    """Attention bias -slope_h * (i - j) for query i, key j; each head sees a different range."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        slopes = torch.tensor(alibi_slopes(config.n_head), dtype=torch.float32)
        self.register_buffer("slopes", slopes, persistent=False)  # (H,)

    def attn_bias(self, start: int, T: int) -> torch.Tensor:
        """Additive bias (H, T, start+T) for queries at start..start+T-1; causal -inf included."""
        q_pos = torch.arange(start, start + T, device=self.slopes.device)[:, None]  # (T, 1)
        k_pos = torch.arange(start + T, device=self.slopes.device)[None, :]  # (1, Tk)
        dist = (q_pos - k_pos).float()  # (T, Tk), >= 0 on and below the causal diagonal
        bias = -self.slopes[:, None, None] * dist  # (H, T, Tk)
        return bias.masked_fill(dist < 0, float("-inf"))


# name -> class; the keys are the file names in conf/pos/.
POSITIONS: dict[str, type[Position]] = {
    "learned": LearnedPosition,
    "sinusoidal": SinusoidalPosition,
    "rope": RotaryPosition,
    "alibi": ALiBiPosition,
    "none": NoPosition,
}
