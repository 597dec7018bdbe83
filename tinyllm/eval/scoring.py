"""Log-likelihoods from a GPT: the one primitive every evaluation is built on.

Two requests cover everything:

- `loglikelihood(pairs)`: log p(continuation | context) for (context ids, continuation ids)
  pairs, plus whether greedy decoding would have produced the continuation. Multiple-choice
  tasks and lm-evaluation-harness's `loglikelihood` use it.
- `rolling(tokens)`: the log-probability of every token of a long stream, each scored once
  with as much context as a sliding window allows (text scoring, `loglikelihood_rolling`).

How a (context, continuation) pair becomes tokens follows lm-evaluation-harness exactly
(`encode_pair`): trailing spaces of the context move to the continuation, the whole string is
encoded, and the continuation is what follows the context's tokens. Sequences longer than the
window keep their last block_size + 1 tokens (the harness's left truncation). That is what
makes our numbers and the harness's agree to the last digit.

Choices that share a context (a multiple-choice item) are scored with the context computed
once: the context fills a KV cache of batch 1, the cache is copied to one row per choice, and
all choices go through the model together as one padded batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinyllm.errors import TinyLLMError

Pair = tuple[list[int], list[int]]


def load(ckpt: Any, device: str = "auto", dtype: str = "fp32") -> tuple[Any, Any, Path]:
    """(model in eval mode, tokenizer, checkpoint file) from ckpt=PATH|RUN_DIR|latest."""
    from tinyllm.checkpoint import resolve_ckpt
    from tinyllm.generate import load_for_generation

    model, tokenizer, _ = load_for_generation(ckpt, device, dtype)
    return model, tokenizer, resolve_ckpt(str(ckpt))


@dataclass
class Window:
    """One forward pass of rolling scoring: stream[start : start + len(ids)] is the input and
    the last `n_scored` of its next-token predictions are counted."""

    ids: list[int]  # input tokens (the targets are the stream shifted by one)
    targets: list[int]
    n_scored: int


class Scorer:
    """Log-likelihoods of token sequences under `model` (a tinyllm GPT, eval mode)."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise TinyLLMError(f"batch_size={batch_size} must be >= 1.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.block_size = int(model.config.block_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def prefix_id(self) -> int | None:
        """The token that stands before a document: BOS, else EOS (what training puts between
        documents), else None (then a text's first token cannot be scored)."""
        tok = self.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    # ------------------------------------------------------------------------- encoding

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-evaluation-harness's rule, so both tools score the very same tokens."""
        encode = self.tokenizer.encode
        if context == "":
            cont = encode(continuation)
            if self.prefix_id is None:
                raise TinyLLMError(
                    "An empty context needs a BOS or EOS token to stand in for it, and this "
                    "checkpoint's tokenizer has neither. Give every item a non-empty context."
                )
            return [self.prefix_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = encode(context + continuation)
        ctx = encode(context)
        return ctx, whole[len(ctx) :]

    # -------------------------------------------------------------------- loglikelihood

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens), greedy?) for each (context, continuation)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise TinyLLMError(
                    f"request {i}: the context and the continuation must each be at least one "
                    "token (an empty choice string scores nothing). Fix the task item."
                )
            if len(cont) > self.block_size:
                raise TinyLLMError(
                    f"request {i}: the continuation is {len(cont)} tokens, longer than the "
                    f"model's context ({self.block_size}); it cannot be scored. Shorten it."
                )
            groups.setdefault(tuple(ctx), []).append(i)
        rows: list[int] = []  # requests that go through the plain (one row each) path
        for ctx, idx in groups.items():
            fits = all(len(ctx) + len(pairs[i][1]) - 1 <= self.block_size for i in idx)
            if len(idx) > 1 and fits:
                for i, r in zip(idx, self._shared_context(list(ctx), [pairs[i][1] for i in idx])):
                    out[i] = r
            else:
                rows.extend(idx)
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b : b + self.batch_size]
            for i, r in zip(chunk, self._rows([pairs[i] for i in chunk])):
                out[i] = r
        return out  # type: ignore[return-value]

    def _rows(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """One padded row per request: input = (ctx + cont)[-(T + 1):][:-1]."""
        T = self.block_size
        inputs = [(ctx + cont)[-(T + 1) :][:-1] for ctx, cont in pairs]
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for r, x in enumerate(inputs):
            batch[r, : len(x)] = torch.tensor(x)  # right padding: causal rows ignore it
        logits = self.model(batch.to(self.device))  # (B, W, V)
        results = []
        for r, (x, (_, cont)) in enumerate(zip(inputs, pairs)):
            n = len(cont)
            results.append(self._score(logits[r, len(x) - n : len(x)], cont))
        return results

    def _shared_context(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Context once (a KV cache of batch 1), then every choice in one batch."""
        model, dev = self.model, self.device
        longest = max(len(c) for c in conts)
        cache1 = model.init_kv_cache(1, max_seq_len=len(ctx))
        first = model(torch.tensor([ctx], device=dev), kv_cache=cache1)[0, -1]  # (V,)
        if longest == 1:
            return [self._score(first[None], c) for c in conts]
        k = len(conts)
        cache = model.init_kv_cache(k, max_seq_len=len(ctx) + longest - 1)
        cache.k[:, :, :, : len(ctx)] = cache1.k[:, :, :, : len(ctx)]  # broadcast over rows
        cache.v[:, :, :, : len(ctx)] = cache1.v[:, :, :, : len(ctx)]
        cache.seq_len = len(ctx)
        batch = torch.zeros(k, longest - 1, dtype=torch.long)
        for r, c in enumerate(conts):
            batch[r, : len(c) - 1] = torch.tensor(c[:-1])  # (k, longest - 1), right padded
        rest = model(batch.to(dev), kv_cache=cache)  # (k, longest - 1, V)
        return [
            self._score(torch.cat([first[None], rest[r, : len(c) - 1]]), c)
            for r, c in enumerate(conts)
        ]

    @staticmethod
    def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
        """logits (n, V) predicting `targets` (n) -> (sum of log-probs, all argmax?)."""
        logp = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        t = torch.tensor(targets, device=logits.device)
        total = logp.gather(1, t[:, None]).sum().item()
        greedy = bool((logp.argmax(dim=-1) == t).all())
        return total, greedy

    # -------------------------------------------------------------------------- rolling

    def windows(self, stream: Iterable[int], stride: int) -> Iterator[Window]:
        """Sliding windows over a token stream; every token but the first is scored once.

        Window j reads stream[j*stride : j*stride + T] and predicts the next token at each
        position; only the predictions not scored by an earlier window count, so the first
        window scores T tokens and each later one `stride` tokens, with at least T - stride
        tokens of context. stride = T gives the non-overlapping windows of validation.
        Memory stays bounded: only the tokens of the current window are kept.
        """
        T = self.block_size
        if not 1 <= stride <= T:
            raise TinyLLMError(f"stride={stride} must be between 1 and block_size={T}.")
        it = iter(stream)
        buf: list[int] = []  # stream[start : start + len(buf)]
        start, scored_to = 0, 0  # targets at stream positions <= scored_to are done
        exhausted = False
        while True:
            while not exhausted and len(buf) < T + 1:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                else:
                    buf.append(nxt)
            end = start + len(buf) - 1  # the last target position this window can reach
            if end <= scored_to:
                return
            yield Window(buf[:-1], buf[1:], end - scored_to)
            scored_to = end
            drop = min(stride, len(buf))
            buf = buf[drop:]
            start += drop

    @torch.no_grad()
    def score_windows(self, windows: Sequence[Window]) -> list[float]:
        """Sum of log-probs of each window's scored targets (windows batched by length)."""
        out: list[float] = []
        for b in range(0, len(windows), self.batch_size):
            chunk = windows[b : b + self.batch_size]
            same = all(len(w.ids) == len(chunk[0].ids) for w in chunk)
            parts = [chunk] if same else [[w] for w in chunk]
            for part in parts:
                x = torch.tensor([w.ids for w in part], device=self.device)  # (B, W)
                y = torch.tensor([w.targets for w in part], device=self.device)  # (B, W)
                logits = self.model(x)  # (B, W, V)
                for r, w in enumerate(part):
                    n = w.n_scored
                    logp = F.log_softmax(logits[r, -n:].float(), dim=-1)  # (n, V)
                    out.append(logp.gather(1, y[r, -n:, None]).sum().item())
        return out

    def rolling(self, tokens: Iterable[int], stride: int | None = None) -> float:
        """Total log-likelihood of a token stream (all tokens after the first)."""
        stride = stride or self.block_size
        total, pending = 0.0, []
        for w in self.windows(tokens, stride):
            pending.append(w)
            if len(pending) == self.batch_size:
                total += sum(self.score_windows(pending))
                pending = []
        return total + sum(self.score_windows(pending))
