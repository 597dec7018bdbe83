"""Sampling: turn next-token logits into tokens, and the decoding loop around the model.

Read this file top to bottom. First the pure functions, each taking logits [B, V] and returning
new logits (filtered tokens are set to -inf, so a later softmax gives them probability 0):

  repetition penalty -> temperature -> top-k -> top-p (nucleus) -> min-p -> sample

That order matters: the penalty works on raw logits (as in CTRL), temperature reshapes the
distribution, and the three filters then cut its tail, each on the already-tempered
distribution (as transformers does). Temperature 0 means greedy: take the argmax.

Then the loop, `iter_generate_ids` / `generate_ids`: prefill the KV cache with the prompt in one
forward pass, then feed one token per step so each step costs O(context) instead of recomputing
the whole sequence (the `use_cache=False` path does that recomputation, for comparison and
tests). When the context is full the window slides: the cache is refilled with the last part of
the sequence and decoding goes on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tinyllm.errors import TinyLLMError

# After the window slides, this fraction of the context is kept (and re-prefilled). Keeping 3/4
# leaves the model most of its context while refilling only every block_size/4 steps.
WINDOW_KEEP = 0.75

# --------------------------------------------------------------------------------------------
# The samplers: pure functions on logits [B, V]


def apply_repetition_penalty(logits: Tensor, prev_ids: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) over the tokens in `prev_ids` [B, T].

    A token already present in the row gets its logit divided by `penalty` when positive and
    multiplied by it when negative, so `penalty > 1` always makes it less likely (a plain
    division would make negative logits *more* likely). Each token is penalised once, however
    often it occurred.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    score = logits.gather(1, prev_ids)  # [B, T]: the logits of the tokens seen before
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, prev_ids, score)  # duplicates write the same value: idempotent


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    if temperature == 1.0:
        return logits
    if temperature <= 0:
        raise TinyLLMError(
            f"temperature={temperature} cannot be applied as a division; use greedy() "
            "(temperature=0) for argmax decoding."
        )
    return logits / temperature


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are all kept)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]: the k-th largest value
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
    whose total probability reaches p. The most likely token is always kept."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens before it already reach p (so the top one always survives)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float | None) -> Tensor:
    """Min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the
    most likely token's. Unlike top-p, the cut adapts to how confident the model is."""
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, -math.inf)


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row: LongTensor [B]."""
    return logits.argmax(dim=-1)


def validate_sampling(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Raise TinyLLMError (naming the option and the fix) for out-of-range sampler values."""

    def bad(option: str, value: object, rule: str) -> TinyLLMError:
        return TinyLLMError(f"Invalid sampling option {option}={value}: {rule}")

    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise bad("temperature", temperature, "use a number >= 0 (0 = greedy, 1 = unchanged).")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
        raise bad("top_k", top_k, "use a whole number >= 0 (0 or null = no top-k filter).")
    if top_p is not None and not (0 < top_p <= 1):
        raise bad("top_p", top_p, "use a number in (0, 1] (1 or null = no nucleus filter).")
    if min_p is not None and not (0 <= min_p <= 1):
        raise bad("min_p", min_p, "use a number in [0, 1] (0 or null = no min-p filter).")
    if repetition_penalty is None or not (repetition_penalty > 0):
        raise bad(
            "repetition_penalty",
            repetition_penalty,
            "use a number > 0 (1 = no penalty, > 1 discourages repeats).",
        )


def sample_next(
    logits: Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    prev_ids: Tensor | None = None,
) -> Tensor:
    """Pick the next token of each row from logits [B, V]: LongTensor [B].

    Values are not validated here (it runs once per token); call `validate_sampling` first.
    """
    logits = logits.float()  # sample in fp32 even when the model runs in bf16
    if prev_ids is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, prev_ids, repetition_penalty)
    if temperature == 0:
        return greedy(logits)
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    logits = min_p_filter(logits, min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # [B]


# --------------------------------------------------------------------------------------------
# The decoding loop


@dataclass
class SamplingConfig:
    """The sampler settings as one value (what the CLI and the text API pass around)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def validate(self) -> SamplingConfig:
        validate_sampling(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        )
        return self


def _window_start(seq_len: int, start: int, block_size: int) -> int:
    """Where the model's window begins, given the sequence length and the current start.

    The window slides only when it would exceed the context; then it jumps so that the last
    WINDOW_KEEP of the context is kept. The cached and uncached paths share this rule, so they
    see exactly the same tokens at every step (and agree token for token under greedy).
    """
    if seq_len - start <= block_size:
        return start
    keep = max(1, min(block_size, int(block_size * WINDOW_KEEP)))
    return seq_len - keep


@torch.inference_mode()  # as a decorator it also covers a generator, step by step
def iter_generate_ids(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """Yield the new tokens step by step, each a LongTensor [B] (on the model's device).

    `idx` is the prompt, LongTensor [B, T] (or [T]), and all rows share its length. A row that
    has finished (EOS or a stop sequence) keeps yielding `eos_id` (or its last token), and the
    loop ends once every row has finished. The consumer may `send()` a bool sequence/tensor [B]
    (True = finish that row) or a plain True (finish all), e.g. when a stop *string* appears.
    """
    validate_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    if max_new_tokens < 0:
        raise TinyLLMError(f"max_new_tokens={max_new_tokens}: use a whole number >= 0.")
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)  # [T] -> [1, T]
    B, T0 = idx.shape
    if T0 == 0:
        raise TinyLLMError("The prompt is empty: start from at least one token (e.g. BOS).")
    if max_new_tokens == 0:
        return
    block_size: int = model.config.block_size
    device = next(model.parameters()).device

    # One buffer holds the whole sequence: the prompt, then each new token written in place.
    seq = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :T0] = idx.to(device)
    n = T0  # tokens in seq so far
    start = max(0, T0 - block_size)  # a long prompt: the last block_size tokens
    if start > 0:
        how = (
            "its positions cannot reach further back"
            if model.config.pos in ("learned", "sinusoidal")
            else "a sliding window keeps the most recent tokens"
        )
        warnings.warn(
            f"The prompt has {T0} tokens but the model's context (block_size) is {block_size}: "
            f"only the last {T0 - start} are used ({how}).",
            stacklevel=2,
        )
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = torch.full((B,), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
    stop_seqs = [torch.tensor(list(s), device=device) for s in stop_ids if len(s) > 0]
    check_done = eos_id is not None or bool(stop_seqs)
    slid = False
    sample = dict(
        generator=generator,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )

    cache = model.init_kv_cache(B, max_seq_len=block_size, device=device) if use_cache else None
    was_training = model.training
    model.eval()  # no dropout while sampling (the training loop calls this mid-training)
    try:
        # prefill: the whole window in one pass; the cache now holds its keys and values
        logits = model(seq[:, start:n], kv_cache=cache)[:, -1, :]  # [B, V]
        for step in range(max_new_tokens):
            prev = seq[:, :n] if repetition_penalty != 1.0 else None
            nxt = sample_next(logits, prev_ids=prev, **sample)  # [B]
            if check_done:
                nxt = torch.where(finished, fill, nxt)  # finished rows repeat the filler
            seq[:, n] = nxt
            n += 1
            if eos_id is not None:
                finished |= nxt == eos_id
            for s in stop_seqs:
                if n - T0 >= len(s):
                    finished |= (seq[:, n - len(s) : n] == s).all(dim=1)  # tail [B, len(s)]
            feedback = yield nxt
            if feedback is not None and feedback is not False:
                if feedback is True:
                    return
                finished |= torch.as_tensor(feedback, dtype=torch.bool, device=device)
                check_done = True
            if step == max_new_tokens - 1 or (check_done and bool(finished.all())):
                return
            # next logits: one new token through the cache, or the window again when it slid
            new_start = _window_start(n, start, block_size)
            if new_start != start and not slid:
                slid = True
                warnings.warn(
                    f"Generation reached the context length ({block_size} tokens); continuing "
                    f"with a sliding window over the last {n - new_start} tokens.",
                    stacklevel=1,
                )
            if cache is None:
                start = new_start
                logits = model(seq[:, start:n])[:, -1, :]  # recompute the whole window
            elif new_start != start:
                start = new_start
                cache.reset()
                logits = model(seq[:, start:n], kv_cache=cache)[:, -1, :]  # re-prefill
            else:
                logits = model(seq[:, n - 1 : n], kv_cache=cache)[:, -1, :]
    finally:
        model.train(was_training)


def generate_ids(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[Tensor], object] | None = None,
    num_samples: int = 1,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after the prompt `idx` ([T] or [B, T]).

    Returns the new tokens of each row (B * num_samples rows: each prompt row repeated
    num_samples times, decoded as one batch), cut before EOS and before a stop sequence.
    `on_token(tokens [B])` is called after every step; it may return True (stop all rows) or a
    bool sequence [B] (stop those rows), which is how callers stop at stop *strings*.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)  # [T] -> [1, T]
    if num_samples < 1:
        raise TinyLLMError(f"num_samples={num_samples}: use a whole number >= 1.")
    if num_samples > 1:
        idx = idx.repeat_interleave(num_samples, dim=0)  # [B, T] -> [B * num_samples, T]
    B = idx.size(0)
    steps = iter_generate_ids(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_id=eos_id,
        stop_ids=stop_ids,
        generator=generator,
        use_cache=use_cache,
    )
    out: list[Tensor] = []
    stopped = torch.zeros(B, dtype=torch.bool)  # rows stopped by on_token, on the CPU
    stopped_at = [max_new_tokens] * B
    feedback = None
    try:
        while True:
            nxt = steps.send(feedback)
            out.append(nxt)
            feedback = on_token(nxt) if on_token is not None else None
            if feedback is True:
                stopped_at = [min(a, len(out)) for a in stopped_at]
            elif feedback is not None and feedback is not False:
                new = torch.as_tensor(feedback, dtype=torch.bool).cpu() & ~stopped
                for r in new.nonzero().flatten().tolist():
                    stopped_at[r] = len(out)
                stopped |= new
    except StopIteration:
        pass
    if not out:
        return [[] for _ in range(B)]
    rows = torch.stack(out, dim=1).tolist()  # [B, steps]: one device->host copy at the end
    return [_cut(row[: stopped_at[r]], eos_id, stop_ids) for r, row in enumerate(rows)]


def _cut(row: list[int], eos_id: int | None, stop_ids: Sequence[Sequence[int]]) -> list[int]:
    """Cut a generated row before its first EOS and before the first stop sequence."""
    end = len(row)
    if eos_id is not None and eos_id in row:
        end = row.index(eos_id)
    for s in stop_ids:
        s = list(s)
        if not s:
            continue
        for i in range(0, end - len(s) + 1):
            if row[i : i + len(s)] == s:
                end = i
                break
    return row[:end]
