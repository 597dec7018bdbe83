"""Sampling: turn next-token logits into tokens, and the decoding loop around the model.

Read this file top to bottom. First the pure functions, each taking logits [B, V] and returning
new logits (filtered tokens are set to -inf, so a later softmax gives them probability 0):

  repetition penalty -> temperature -> top-k -> top-p (nucleus) -> min-p -> sample

That order matters: the penalty works on raw logits (as in CTRL), temperature reshapes the
distribution, and the three filters then cut its tail, each on the already-tempered
distribution (as transformers does). Temperature 0 means greedy: take the argmax.

Then THE loop, `iter_generate_ids`, driven by one settings value (`SamplingConfig`): prefill
the KV cache with the prompt in one forward pass, then feed one token per step so each step
costs O(context) instead of recomputing the whole sequence (the `use_cache=False` path does
that recomputation, for comparison and tests). When the context is full the window slides:
the cache is refilled with the last part of the sequence and decoding goes on. Everything else
wraps that loop: `generate_ids` (a batch of id rows), `generate_stream` / `generate` (text),
`greedy_answer_ids` (the Q&A exact match).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tinyllm.chat import ChatTemplate
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


@dataclass(frozen=True)
class SamplingConfig:
    """Every setting of one decode, as one value: what the CLI builds from its options, what
    the text, stream, batch and exact-match wrappers hand to the one loop below.

    The wrappers also take the fields as keywords (`temperature=0.8`), which replace those of
    `sampling=` (default: SamplingConfig()); see `SamplingConfig.of`.
    """

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int = 200
    use_cache: bool = True  # False recomputes the whole window each step (for comparison)

    def validate(self) -> SamplingConfig:
        validate_sampling(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        )
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TinyLLMError(f"max_new_tokens={n}: use a whole number >= 0.")
        return self

    @classmethod
    def of(
        cls,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> SamplingConfig:
        """`sampling` (or the defaults) with `options` (and max_new_tokens unless None)
        replaced, validated."""
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TinyLLMError(f"Unknown sampling option(s) {unknown}. Valid options: {names}.")
        return dataclasses.replace(sampling or cls(), **options).validate()

    def sampler(self, generator: torch.Generator | None) -> Callable[..., Tensor]:
        """sample_next with these settings bound: `(logits [B, V], prev_ids=) -> [B]`.
        Bound once per decode, so a step pays one call and no settings lookups."""
        return functools.partial(
            sample_next,
            generator=generator,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )


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


def _warn_cropped(model: nn.Module, T0: int, start: int) -> None:
    # The position object says whether it can reach further back (a bounded, absolute
    # encoding cannot); a model without one (a test double) is treated as relative.
    bounded = getattr(getattr(model, "pos", None), "max_len", None) is not None
    how = (
        "its positions cannot reach further back"
        if bounded
        else "a sliding window keeps the most recent tokens"
    )
    warnings.warn(
        f"The prompt has {T0} tokens but the model's context (block_size) is "
        f"{model.config.block_size}: only the last {T0 - start} are used ({how}).",
        stacklevel=3,
    )


class _Window:
    """The model's view of the sequence: the KV cache (or none) and where the window starts.

    `logits(seq, n)` gives the next-token logits [B, V] after the first n tokens of seq: one
    new token through the cache, or the whole window again when it slid (or without a cache).
    """

    def __init__(
        self, model: nn.Module, B: int, T0: int, use_cache: bool, device: torch.device
    ) -> None:
        self.model = model
        self.block_size: int = model.config.block_size
        self.start = max(0, T0 - self.block_size)  # a long prompt: the last block_size tokens
        self.cache = (
            model.init_kv_cache(B, max_seq_len=self.block_size, device=device)
            if use_cache
            else None
        )
        self.slid = False

    def prefill(self, seq: Tensor, n: int) -> Tensor:
        """The whole window in one pass; the cache now holds its keys and values."""
        return self.model(seq[:, self.start : n], kv_cache=self.cache)[:, -1, :]  # [B, V]

    def logits(self, seq: Tensor, n: int) -> Tensor:
        new_start = _window_start(n, self.start, self.block_size)
        if new_start != self.start and not self.slid:
            self.slid = True
            warnings.warn(
                f"Generation reached the context length ({self.block_size} tokens); continuing "
                f"with a sliding window over the last {n - new_start} tokens.",
                stacklevel=2,
            )
        if self.cache is None:
            self.start = new_start
            return self.model(seq[:, self.start : n])[:, -1, :]  # recompute the whole window
        if new_start != self.start:
            self.start = new_start
            self.cache.reset()
            return self.prefill(seq, n)  # re-prefill the slid window
        return self.model(seq[:, n - 1 : n], kv_cache=self.cache)[:, -1, :]


def _as_batch(idx: Tensor) -> Tensor:
    """A prompt as [B, T] ([T] -> [1, T]), refusing an empty one."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)  # [T] -> [1, T]
    if idx.size(1) == 0:
        raise TinyLLMError("The prompt is empty: start from at least one token (e.g. BOS).")
    return idx


@torch.inference_mode()  # as a decorator it also covers a generator, step by step
def iter_generate_ids(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int | None = None,
    *,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    sampling: SamplingConfig | None = None,
    **options: Any,
) -> Iterator[Tensor]:
    """THE decoding loop. Yield the new tokens step by step, each a LongTensor [B] (on the
    model's device); every other way to generate (ids, text, stream, batch, exact match)
    wraps this one.

    `idx` is the prompt, LongTensor [B, T] (or [T]), and all rows share its length. The settings
    are `sampling` with `options` (SamplingConfig fields) and `max_new_tokens` replaced. A row
    that has finished (EOS or a stop sequence) keeps yielding `eos_id` (or 0 without one), and
    the loop ends once every row has finished. The consumer may `send()` a bool sequence/tensor
    [B] (True = finish that row) or a plain True (finish all), e.g. when a stop *string* appears.
    """
    s = SamplingConfig.of(sampling, max_new_tokens, **options)
    idx = _as_batch(idx)
    B, T0 = idx.shape
    if s.max_new_tokens == 0:
        return
    device = next(model.parameters()).device

    # One buffer holds the whole sequence: the prompt, then each new token written in place.
    seq = torch.empty(B, T0 + s.max_new_tokens, dtype=torch.long, device=device)
    seq[:, :T0] = idx.to(device)
    n = T0  # tokens in seq so far
    window = _Window(model, B, T0, s.use_cache, device)
    if window.start > 0:
        _warn_cropped(model, T0, window.start)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = torch.full((B,), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
    stop_seqs = [torch.tensor(list(t), device=device) for t in stop_ids if len(t) > 0]
    check_done = eos_id is not None or bool(stop_seqs)

    was_training = model.training
    model.eval()  # no dropout while sampling (the training loop calls this mid-training)
    try:
        sample = s.sampler(generator)
        penalise = s.repetition_penalty != 1.0
        logits = window.prefill(seq, n)
        for step in range(s.max_new_tokens):
            nxt = sample(logits, prev_ids=seq[:, :n] if penalise else None)  # [B]
            if check_done:
                nxt = torch.where(finished, fill, nxt)  # finished rows repeat the filler
            seq[:, n] = nxt
            n += 1
            if eos_id is not None:
                finished |= nxt == eos_id
            for t in stop_seqs:
                if n - T0 >= len(t):
                    finished |= (seq[:, n - len(t) : n] == t).all(dim=1)  # tail [B, len(t)]
            feedback = yield nxt
            if feedback is not None and feedback is not False:
                if feedback is True:
                    return
                finished |= torch.as_tensor(feedback, dtype=torch.bool, device=device)
                check_done = True
            if step == s.max_new_tokens - 1 or (check_done and bool(finished.all())):
                return
            logits = window.logits(seq, n)
    finally:
        model.train(was_training)


def generate_ids(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int | None = None,
    *,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], object] | None = None,
    num_samples: int = 1,
    sampling: SamplingConfig | None = None,
    **options: Any,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after the prompt `idx` ([T] or [B, T]).

    Returns the new tokens of each row (B * num_samples rows: each prompt row repeated
    num_samples times, decoded as one batch), cut before EOS and before a stop sequence.
    `on_token(tokens [B])` is called after every step; it may return True (stop all rows) or a
    bool sequence [B] (stop those rows), which is how callers stop at stop *strings*.
    """
    idx = _as_batch(idx)
    if num_samples < 1:
        raise TinyLLMError(f"num_samples={num_samples}: use a whole number >= 1.")
    if num_samples > 1:
        idx = idx.repeat_interleave(num_samples, dim=0)  # [B, T] -> [B * num_samples, T]
    s = SamplingConfig.of(sampling, max_new_tokens, **options)
    B = idx.size(0)
    steps = iter_generate_ids(
        model, idx, eos_id=eos_id, stop_ids=stop_ids, generator=generator, sampling=s
    )
    out: list[Tensor] = []
    stopped = torch.zeros(B, dtype=torch.bool)  # rows stopped by on_token, on the CPU
    stopped_at = [s.max_new_tokens] * B
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


# --------------------------------------------------------------------------------------------
# Text in, text out: the API under the CLI (and the training loop's sample logging)


class TextStream:
    """Turns generated token ids into text pieces that are safe to show.

    - UTF-8 split across tokens: bytes go through an incremental decoder, which emits only
      complete characters (a lone half of an emoji waits for its other half).
    - Stop strings: text that could be the start of a stop string is held back until it is
      clear it is not; when a stop string appears, the text before it is emitted and `done`
      is set.
    - `lead`: characters to drop from the very start (a chat template's space after
      "Answer:"), once it is known the text starts with them.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), lead: str = "") -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.lead = lead
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (after the lead)
        self.emitted = 0  # how much of `text` has been handed out
        self.done = False

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that can be shown (often '')."""
        if self.done:
            return ""
        self.text += self.decoder.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """The end of generation: release whatever is held back (a partial character shows
        as U+FFFD, as in `tokenizer.decode`)."""
        if self.done:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.lead:
            if not final and len(self.text) < len(self.lead) and self.lead.startswith(self.text):
                return ""  # might still be the lead: wait
            if self.text.startswith(self.lead):
                self.text = self.text[len(self.lead) :]
            self.lead = ""
        text, e = self.text, self.emitted
        if self.stop:
            # A stop string cannot begin before `emitted`: any text that could have started
            # one was held back. So search only from there.
            hits = [i for i in (text.find(s, e) for s in self.stop) if i >= 0]
            if hits:
                self.done = True
                self.emitted = min(hits)
                self.text = text[: self.emitted]
                return text[e : self.emitted]
        end = len(text)
        if self.stop and not final:
            # hold back the longest tail that is the beginning of some stop string
            for k in range(min(max(map(len, self.stop)) - 1, end - e), 0, -1):
                if any(s.startswith(text[end - k :]) for s in self.stop):
                    end -= k
                    break
        self.emitted = end
        return text[e:end]


def _prompt_ids(
    tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat_template: Any
) -> tuple[list[int], str, list[str]]:
    """Ids of the prompt, the lead to strip from the answer and extra stop strings."""
    if chat_template is not None:
        tmpl = ChatTemplate.coerce(chat_template)
        stops = [tmpl.assistant_suffix] if tmpl.assistant_suffix else []
        return tmpl.encode_prompt(tokenizer, prompt), tmpl.answer_lead, stops
    if not isinstance(prompt, str):
        raise TinyLLMError(
            "A message list as the prompt needs a chat template (the checkpoint's "
            "`chat_template`); without one, pass the prompt as a string."
        )
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # the model needs at least one token to condition on: start a document
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise TinyLLMError(
                "The prompt is empty and the tokenizer has neither a bos nor an eos special "
                "token to start from. Pass a non-empty `prompt=`."
            )
        ids = [int(start)]
    return ids, "", []


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A generator seeded with `seed` on `device` (None without a seed: torch's global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _text_setup(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    stop: str | Sequence[str],
    chat_template: Any,
    rows: int,
) -> tuple[Tensor, list[TextStream]]:
    """The prompt as ids [1, T] on the model's device, and one TextStream per output row."""
    stop = [stop] if isinstance(stop, str) else list(stop)
    ids, lead, extra_stops = _prompt_ids(tokenizer, prompt, chat_template)
    streams = [TextStream(tokenizer, stop + extra_stops, lead) for _ in range(rows)]
    return torch.tensor([ids], dtype=torch.long, device=_model_device(model)), streams


def generate_stream(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]] = "",
    max_new_tokens: int | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: str | Sequence[str] = (),
    stop_at_eos: bool = True,
    chat_template: Any = None,
    stats: dict[str, Any] | None = None,
    sampling: SamplingConfig | None = None,
    **options: Any,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as each is complete.

    Joining the pieces gives exactly what `generate(...)` returns for the same arguments. With
    a `chat_template` (a ChatTemplate or its dict, as stored in fine-tuned checkpoints) the
    prompt is a question (or a message list) and the answer ends at EOS. `stats`, when given,
    receives {"prompt_tokens", "new_tokens"}. Settings: `sampling` and/or its fields as
    keywords (max_new_tokens=, temperature=, top_k=, ...).
    """
    s = SamplingConfig.of(sampling, max_new_tokens, **options)
    idx, (text,) = _text_setup(model, tokenizer, prompt, stop, chat_template, rows=1)
    eos_id = tokenizer.eos_id if stop_at_eos else None
    if generator is None:
        generator = make_generator(idx.device, seed)
    steps = iter_generate_ids(model, idx, eos_id=eos_id, generator=generator, sampling=s)
    n = 0
    if stats is not None:
        stats.update(prompt_tokens=idx.size(1), new_tokens=0)
    try:
        for nxt in steps:
            tok = int(nxt[0])
            n += 1
            if stats is not None:
                stats["new_tokens"] = n
            if tok == eos_id:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            if text.done:
                break
        tail = text.flush()
        if tail:
            yield tail
    finally:
        steps.close()  # also when the consumer stops early (Ctrl-C): restores the model's mode


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]] = "",
    max_new_tokens: int | None = None,
    *,
    num_samples: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: str | Sequence[str] = (),
    stop_at_eos: bool = True,
    chat_template: Any = None,
    include_prompt: bool = False,
    stats: dict[str, Any] | None = None,
    sampling: SamplingConfig | None = None,
    **options: Any,
) -> str | list[str]:
    """Continue `prompt` and return the new text (a list of num_samples texts when > 1).

    The samples of num_samples > 1 are decoded as one batch. Generation stops at EOS (unless
    stop_at_eos=False), at any of the `stop` strings (which are not included) or after
    max_new_tokens. An empty prompt starts from BOS. `seed` makes sampling reproducible.
    `include_prompt=True` puts the prompt text in front (not with a chat template). `stats`,
    when given, receives {"prompt_tokens", "new_tokens"} (summed over samples). Settings:
    `sampling` and/or its fields as keywords (max_new_tokens=, temperature=, top_k=, ...).
    """
    if num_samples < 1:
        raise TinyLLMError(f"num_samples={num_samples}: use a whole number >= 1.")
    head = prompt if include_prompt and chat_template is None and isinstance(prompt, str) else ""
    if generator is None:
        generator = make_generator(_model_device(model), seed)
    text = dict(stop=stop, stop_at_eos=stop_at_eos, chat_template=chat_template, stats=stats)
    s = SamplingConfig.of(sampling, max_new_tokens, **options)
    if num_samples == 1:
        pieces = generate_stream(model, tokenizer, prompt, generator=generator, sampling=s, **text)
        return head + "".join(pieces)
    texts = _generate_batch(model, tokenizer, prompt, num_samples, generator, s, **text)
    return [head + t for t in texts]


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    num_samples: int,
    generator: torch.Generator | None,
    sampling: SamplingConfig,
    stop: str | Sequence[str],
    stop_at_eos: bool,
    chat_template: Any,
    stats: dict[str, Any] | None,
) -> list[str]:
    """num_samples continuations of one prompt, decoded as one batch of rows."""
    idx, streams = _text_setup(model, tokenizer, prompt, stop, chat_template, rows=num_samples)
    pieces: list[list[str]] = [[] for _ in range(num_samples)]
    eos_id = tokenizer.eos_id if stop_at_eos else None
    ended = [False] * num_samples  # EOS seen or a stop string completed
    if stats is not None:
        stats.update(prompt_tokens=idx.size(1), new_tokens=0)

    def on_token(nxt: Tensor) -> list[bool] | None:
        for r, tok in enumerate(nxt.tolist()):
            if ended[r]:
                continue
            if stats is not None:
                stats["new_tokens"] += 1
            if tok == eos_id:
                ended[r] = True
                continue
            pieces[r].append(streams[r].push(tok))
            ended[r] = streams[r].done
        return [s.done for s in streams] if any(s.done for s in streams) else None

    # the text streams see every token through on_token, so the returned ids are not needed
    generate_ids(
        model,
        idx,
        eos_id=eos_id,
        generator=generator,
        on_token=on_token,
        num_samples=num_samples,
        sampling=sampling,
    )
    for s, p in zip(streams, pieces):
        if not s.done:
            p.append(s.flush())
    return ["".join(p) for p in pieces]


# --------------------------------------------------------------------------------------------
# Exact match: the Q&A evaluation decodes through the same loop, greedily


def greedy_answer_ids(
    model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int | None
) -> list[int]:
    """The greedy continuation of prompt_ids: the new ids, the eos included if reached."""
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=_model_device(model))
    steps = iter_generate_ids(model, idx, max_new_tokens, eos_id=eos_id, temperature=0.0)
    return [int(t[0]) for t in steps]
