"""Several processes training one model: what they must agree on, and how cheaply.

Every decision that changes what a rank does next (stop on a NaN, the learning rate under a
time budget) must be taken from the same numbers on every rank; otherwise one rank stops while
the others wait for it in the next all-reduce, or the replicas drift apart. The numbers are
agreed once per logging window, in one collective (`agree_window`), never per step: a per-step
collective, like a per-step `.item()`, makes the host wait for the device on every step.

Also here: the Lightning strategies tinyllm builds (DDP without buffer broadcasts, FSDP
wrapped per Block), and running a compiled model eagerly
(decoding a text sample would otherwise recompile the training graph for every new length).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tinyllm.errors import TinyLLMError


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_window(loss_sum: torch.Tensor, steps: int, t0: float | None) -> tuple[float, float]:
    """Once per logging window: (mean train loss over every rank's steps, rank 0's clock).

    One all-reduce of a small fp64 vector [loss sum, steps, rank 0's seconds since t0], read
    back in one device -> host transfer: every rank gets the same mean (NaN on every rank if
    any rank saw NaN, so all of them stop together) and the same elapsed time.
    """
    own = time.monotonic() - t0 if t0 is not None else 0.0
    dist = torch.distributed
    world = world_size()
    is_zero = world == 1 or dist.get_rank() == 0
    dev = loss_sum.device
    vec = torch.stack(
        [
            loss_sum.detach().to(torch.float64).reshape(()),
            torch.tensor(float(steps), dtype=torch.float64, device=dev),
            torch.tensor(own if is_zero else 0.0, dtype=torch.float64, device=dev),
        ]
    )
    if world > 1:
        dist.all_reduce(vec)  # a sum: the clock term is non-zero on rank 0 only
    total, n, elapsed = vec.tolist()
    return total / n, elapsed


# -- strategies --------------------------------------------------------------------------------
def build_strategy(strategy: Any, world: int) -> Any:
    """Lightning strategy object for `trainer.strategy` (a name), or the value unchanged.

    - ddp: `broadcast_buffers=False`: the only buffers are constant tables (RoPE, sinusoidal
      positions, ALiBi slopes), identical on every rank; broadcasting them each step is waste.
    - fsdp: each transformer Block is its own FSDP unit (auto-wrap policy), so only one
      Block's full weights live at a time outside the step's compute.
    """
    name = str(strategy).lower()
    if name == "auto" and world > 1:
        name = "ddp"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(broadcast_buffers=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from tinyllm.model.gpt import Block

        return FSDPStrategy(auto_wrap_policy={Block})
    return strategy


def is_fsdp(trainer: Any) -> bool:
    """True when the trainer shards parameters (Lightning's FSDP strategy)."""
    strategy = getattr(trainer, "strategy", None)
    return "FSDP" in type(strategy).__name__


# -- compiled models, run eagerly ---------------------------------------------------------------
@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Run a model compiled in place (`model.compile()`) without its compiled graph.

    Decoding calls the model with a new sequence length and a KV cache at every token, so
    the compiled graph would be recompiled (and broken) again and again for a few tokens of
    text; the eager module gives the same numbers. torch.compiler.set_stance("force_eager")
    where it exists (torch >= 2.6), else the compiled call is set aside for the duration.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        with set_stance("force_eager"):
            yield model
        return
    compiled = model.__dict__.get("_compiled_call_impl")
    model._compiled_call_impl = None
    try:
        yield model
    finally:
        model._compiled_call_impl = compiled


def refuse_skip_with_ranks(nan_policy: str, world: int) -> None:
    """nan_policy=skip decides per step; with several ranks Lightning cannot skip a step."""
    if nan_policy == "skip" and world > 1:
        raise TinyLLMError(
            f"nan_policy=skip with {world} processes: skipping a step would need every rank to "
            "agree on every step's loss (a collective and a device sync per step), and "
            "Lightning refuses to skip a step in distributed training. Use nan_policy=stop "
            "(every rank stops together at the logging window holding the first non-finite "
            "loss), or train on one device."
        )
