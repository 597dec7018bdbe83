"""The samplers on hand-checkable logits, and the decoding loop on a toy model.

The toy model follows GPT's interface (config.block_size/pos, init_kv_cache, forward with
kv_cache) with a cache that simply stores the window's tokens, so the loop's logic (prefill,
decode, sliding window, EOS, stop sequences, batching) is tested in milliseconds. The same
properties on the real GPT are in tests/test_generate.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tinyllm.errors import TinyLLMError
from tinyllm.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    generate_ids,
    greedy,
    iter_generate_ids,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
    validate_sampling,
)

NEG = -math.inf


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # [1, V]


# ---- samplers ------------------------------------------------------------------------------


def test_temperature_scales_logits() -> None:
    x = torch.tensor([[2.0, -4.0, 0.0]])
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([[1.0, -2.0, 0.0]]))
    assert apply_temperature(x, 1.0) is x


def test_top_k_keeps_k_largest() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, 0.0, 9.0, 1.0]])
    out = top_k_filter(x, 2)
    assert out.tolist() == [[NEG, 5.0, NEG, 4.0], [NEG, NEG, 9.0, 1.0]]
    assert top_k_filter(x, 0) is x and top_k_filter(x, None) is x and top_k_filter(x, 10) is x


def test_top_p_keeps_smallest_nucleus() -> None:
    x = logits_of([0.5, 0.1, 0.3, 0.1])
    # 0.5 alone < 0.7; 0.5 + 0.3 = 0.8 >= 0.7 -> keep tokens 0 and 2
    assert torch.isinf(top_p_filter(x, 0.7)).tolist() == [[False, True, False, True]]
    # just above 0.8 needs a third token (one of the two ties at 0.1)
    assert torch.isinf(top_p_filter(x, 0.85)).sum().item() == 1
    # the most likely token always survives, even for tiny p
    assert torch.isinf(top_p_filter(x, 0.01)).tolist() == [[False, True, True, True]]
    assert top_p_filter(x, 1.0) is x


def test_min_p_relative_to_max() -> None:
    x = logits_of([0.5, 0.1, 0.3, 0.1])
    # threshold 0.4 * 0.5 = 0.2 -> keep 0.5 and 0.3
    assert torch.isinf(min_p_filter(x, 0.4)).tolist() == [[False, True, False, True]]
    assert min_p_filter(x, 0.0) is x


def test_repetition_penalty_ctrl_style() -> None:
    x = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    prev = torch.tensor([[0, 1, 1]])  # token 1 twice: penalised once
    out = apply_repetition_penalty(x, prev, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]
    assert apply_repetition_penalty(x, prev, 1.0) is x


def test_greedy_and_temperature_zero() -> None:
    x = torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 0.0]])
    assert greedy(x).tolist() == [1, 0]
    assert sample_next(x, temperature=0).tolist() == [1, 0]
    # with a repetition penalty, greedy moves off the seen token
    prev = torch.tensor([[1], [0]])
    out = sample_next(x, temperature=0, repetition_penalty=2.0, prev_ids=prev)
    assert out.tolist() == [2, 0]  # row 1: 5/2 = 2.5 still beats 0


def test_sample_next_respects_filters_and_seed() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)  # [500, 4]
    g = torch.Generator().manual_seed(0)
    out = sample_next(x, g, temperature=1.0, top_k=2)
    assert set(out.tolist()) == {2, 3}
    out2 = sample_next(x, torch.Generator().manual_seed(0), temperature=1.0, top_k=2)
    assert torch.equal(out, out2)
    # top-p and min-p both leave only the argmax when it dominates
    y = logits_of([0.97, 0.01, 0.01, 0.01]).repeat(200, 1)
    assert set(sample_next(y, g, top_p=0.9).tolist()) == {0}
    assert set(sample_next(y, g, min_p=0.1).tolist()) == {0}
    # a high temperature flattens: the unlikely tokens appear
    assert len(set(sample_next(y, g, temperature=50.0).tolist())) == 4


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_validate_rejects_out_of_range(kwargs: dict, option: str) -> None:
    with pytest.raises(TinyLLMError, match=option):
        validate_sampling(**kwargs)


def test_validate_accepts_edges() -> None:
    validate_sampling(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    validate_sampling(temperature=2.0, top_k=5, top_p=0.5, min_p=1.0, repetition_penalty=0.5)


# ---- the loop, on a toy model --------------------------------------------------------------


class ToyCache:
    """Stores the window's tokens: the toy's 'keys and values'."""

    def __init__(self, batch_size: int, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.tokens = torch.empty(batch_size, 0, dtype=torch.long)

    @property
    def seq_len(self) -> int:
        return self.tokens.size(1)

    def reset(self) -> None:
        self.tokens = self.tokens[:, :0]

    def crop(self, n: int) -> None:
        self.tokens = self.tokens[:, :n]


class ToyLM(nn.Module):
    """logits[t] = E[x_t] + mean over the window up to t of F[x_i]: depends on the whole
    window, so any slip in what the cache holds changes the output."""

    def __init__(self, vocab: int = 11, block_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.F = nn.Parameter(3 * torch.randn(vocab, vocab, generator=g))
        self.config = SimpleNamespace(block_size=block_size, pos="rope", vocab_size=vocab)
        self.calls: list[int] = []  # tokens fed per forward

    def init_kv_cache(self, batch_size, max_seq_len=None, device=None, dtype=None) -> ToyCache:
        return ToyCache(batch_size, max_seq_len or self.config.block_size)

    def forward(self, idx: torch.Tensor, kv_cache: ToyCache | None = None) -> torch.Tensor:
        self.calls.append(idx.size(1))
        past = kv_cache.tokens if kv_cache is not None else idx[:, :0]
        full = torch.cat([past, idx], dim=1)  # [B, P + T]
        assert full.size(1) <= self.config.block_size, "window exceeds the context"
        if kv_cache is not None:
            kv_cache.tokens = full
        csum = self.F[full].cumsum(dim=1) / torch.arange(1, full.size(1) + 1)[None, :, None]
        return (self.E[idx] + csum[:, -idx.size(1) :]).float()  # [B, T, V]


def test_cached_equals_uncached_greedy_with_sliding_window() -> None:
    model = ToyLM(block_size=8)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match="sliding window"):
        a = generate_ids(model, prompt, 30, temperature=0)
    b = generate_ids(model, prompt, 30, temperature=0, use_cache=False)
    assert a == b and len(a[0]) == 30
    assert max(model.calls) <= 8


def test_cache_feeds_one_token_per_step() -> None:
    model = ToyLM(block_size=64)
    generate_ids(model, torch.tensor([1, 2, 3, 4]), 10, temperature=0)
    assert model.calls == [4] + [1] * 9  # prefill, then one token per step


def test_long_prompt_is_cropped_with_warning() -> None:
    model = ToyLM(block_size=8)
    model.config.pos = "learned"
    prompt = torch.arange(20) % 11
    with pytest.warns(UserWarning, match="only the last 8"):
        out = generate_ids(model, prompt, 3, temperature=0)
    assert model.calls[0] == 8 and len(out[0]) == 3


def test_seed_reproducible_and_batched_samples_differ() -> None:
    model = ToyLM(vocab=50)
    prompt = torch.tensor([1, 2])

    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return generate_ids(model, prompt, 6, temperature=2.0, generator=g, num_samples=4)

    a, b = run(0), run(0)
    assert a == b and len(a) == 4
    assert len({tuple(r) for r in a}) > 1  # the samples of a batch are independent
    assert run(1) != a


def test_eos_stops_row_and_loop() -> None:
    model = ToyLM()
    greedy_out = generate_ids(model, torch.tensor([1]), 6, temperature=0)[0]
    eos = greedy_out[2]
    k = greedy_out.index(eos)
    model.calls.clear()
    out = generate_ids(model, torch.tensor([1]), 6, temperature=0, eos_id=eos)[0]
    assert out == greedy_out[:k]
    assert len(model.calls) == k + 1  # the loop ended at EOS, not at max_new_tokens


def test_stop_sequences_and_on_token() -> None:
    model = ToyLM()
    full = generate_ids(model, torch.tensor([1]), 8, temperature=0)[0]
    stop = full[3:5]
    out = generate_ids(model, torch.tensor([1]), 8, temperature=0, stop_ids=[stop])[0]
    first = next(i for i in range(len(full) - 1) if full[i : i + 2] == stop)
    assert out == full[:first]
    # on_token returning True stops everything after that step
    seen: list[int] = []

    def cb(tok: torch.Tensor) -> bool:
        seen.append(int(tok[0]))
        return len(seen) == 3

    out = generate_ids(model, torch.tensor([1]), 8, temperature=0, on_token=cb)[0]
    assert out == full[:3] and seen == full[:3]


def test_iter_generate_ids_send_finishes_rows() -> None:
    model = ToyLM()
    steps = iter_generate_ids(model, torch.tensor([[1], [2]]), 10, temperature=0, eos_id=9)
    first = next(steps)
    assert first.shape == (2,)
    second = steps.send([True, False])  # finish row 0
    assert int(second[0]) == 9  # a finished row yields the filler (eos_id)
    assert sum(1 for _ in steps) == 8


def test_model_mode_restored_and_no_grad() -> None:
    model = ToyLM()
    model.train()
    generate_ids(model, torch.tensor([1]), 3)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments() -> None:
    model = ToyLM()
    with pytest.raises(TinyLLMError, match="top_p"):
        generate_ids(model, torch.tensor([1]), 3, top_p=0)
    with pytest.raises(TinyLLMError, match="empty"):
        generate_ids(model, torch.tensor([], dtype=torch.long), 3)
    assert generate_ids(model, torch.tensor([1]), 0) == [[]]


# ---- one loop, one settings object ---------------------------------------------------------


def test_settings_object_equals_keywords_and_rejects_unknown_options() -> None:
    from tinyllm.sampling import SamplingConfig

    model = ToyLM(vocab=50)
    s = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=7)

    def run(**kw) -> list[list[int]]:
        return generate_ids(model, torch.tensor([1, 2]), generator=torch.manual_seed(3), **kw)

    by_object = run(sampling=s)
    assert by_object == run(temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=7)
    assert len(by_object[0]) == 7
    assert run(sampling=s, max_new_tokens=3) == [by_object[0][:3]]  # a keyword overrides
    with pytest.raises(TinyLLMError, match=r"top_kk.*Valid options"):
        run(top_kk=5)
    with pytest.raises(TinyLLMError, match="max_new_tokens=-1"):
        SamplingConfig(max_new_tokens=-1).validate()


def test_cropped_prompt_warning_asks_the_position_object() -> None:
    """Whether a cropped prompt 'cannot reach further back' comes from the position encoding
    (a bounded max_len), not from a list of names."""
    from tinyllm.model import GPT, ModelConfig

    for pos, words in [("learned", "cannot reach further back"), ("rope", "sliding window")]:
        model = GPT(
            ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, pos=pos)
        )
        with pytest.warns(UserWarning, match=words):
            generate_ids(model, torch.arange(12) % 32, 2, temperature=0)


def test_exact_match_decodes_through_the_one_loop(monkeypatch) -> None:
    """The Q&A evaluation's greedy answer is the loop's temperature-0 output, eos included."""
    import tinyllm.sampling as sampling

    model = ToyLM()
    want = generate_ids(model, torch.tensor([1, 2]), 6, temperature=0)[0]
    eos = want[3]
    calls = []
    loop = sampling.iter_generate_ids

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return loop(*args, **kwargs)

    monkeypatch.setattr(sampling, "iter_generate_ids", spy)
    got = sampling.greedy_answer_ids(model, [1, 2], 6, eos_id=eos)
    assert got == want[: want.index(eos) + 1]
    assert calls and calls[0]["temperature"] == 0.0 and calls[0]["eos_id"] == eos
