"""The GPT: registries, the architecture matrix, KV cache, init, overfitting, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tinyllm.errors import TinyLLMError
from tinyllm.model import ACTIVATIONS, GPT, NORMS, POSITIONS, ModelConfig
from tinyllm.model.mlp import mlp_hidden_size

V = 32  # tiny vocab keeps the matrix fast
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_multiple_of=8)
    base.update(kw)
    return ModelConfig(**base)


def build(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw))


# ------------------------------------------------------------------ architecture matrix


def check_causal(model: GPT, idx: torch.Tensor) -> None:
    """Changing token t leaves the logits at positions < t unchanged (and changes t's)."""
    t = idx.size(1) // 2
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def check_cache(model: GPT, idx: torch.Tensor) -> None:
    """Chunked prefill and token-by-token decoding with the KV cache == one full forward."""
    full = model(idx)
    T = idx.size(1)
    cache = model.init_kv_cache(idx.size(0))
    chunks = [model(idx[:, :5], kv_cache=cache), model(idx[:, 5:8], kv_cache=cache)]
    chunks += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(8, T)]
    assert cache.seq_len == T
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, **TOL)
    # Reuse after reset, and rewind with crop: the same logits again.
    cache.reset()
    torch.testing.assert_close(model(idx[:, :10], kv_cache=cache), full[:, :10], **TOL)
    cache.crop(6)
    torch.testing.assert_close(model(idx[:, 6:9], kv_cache=cache), full[:, 6:9], **TOL)


def train_step_lowers_loss(model: GPT, idx: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert losses[1] < losses[0]


@pytest.mark.parametrize(
    "norm, activation, pos", list(itertools.product(NORMS, ACTIVATIONS, POSITIONS))
)
def test_matrix(norm: str, activation: str, pos: str) -> None:
    model = build(norm=norm, activation=activation, pos=pos).eval()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        check_causal(model, idx)
        check_cache(model, idx)
    train_step_lowers_loss(model, idx)


@pytest.mark.parametrize("pos", list(POSITIONS))
@pytest.mark.parametrize("n_kv_head", [1, 2])  # MQA, GQA (n_head=4)
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_gqa_mqa(pos: str, n_kv_head: int, attn_impl: str) -> None:
    model = build(pos=pos, n_kv_head=n_kv_head, attn_impl=attn_impl, norm="rmsnorm").eval()
    assert model.transformer.h[0].attn.c_attn.out_features == (4 + 2 * n_kv_head) * 8
    idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        check_causal(model, idx)
        check_cache(model, idx)


@pytest.mark.parametrize(
    "flags",
    [
        dict(qk_norm=True),
        dict(post_norm=True),
        dict(bias=False),
        dict(tie_weights=False),
        dict(logit_softcap=5.0),
        dict(qk_norm=True, norm="rmsnorm", pos="rope", n_kv_head=2),
    ],
)
def test_flags(flags: dict) -> None:
    model = build(**flags).eval()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        check_causal(model, idx)
        check_cache(model, idx)


def test_manual_equals_sdpa_and_returns_attention() -> None:
    for pos in ("learned", "alibi", "rope"):
        model = build(pos=pos, n_kv_head=2).eval()
        idx = torch.randint(0, V, (2, 10))
        with torch.no_grad():
            logits = model(idx)
            logits2, attns = model(idx, return_attn=True)  # switches to the manual path
        torch.testing.assert_close(logits2, logits, **TOL)
        assert len(attns) == 2 and attns[0].shape == (2, 4, 10, 10)
        torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 10))
        assert (attns[1].triu(1) == 0).all()  # nothing attends to the future


def test_attention_with_cache_returns_rows_over_all_keys() -> None:
    model = build(pos="rope").eval()
    cache = model.init_kv_cache(1)
    with torch.no_grad():
        model(torch.randint(0, V, (1, 6)), kv_cache=cache)
        _, attns = model(torch.randint(0, V, (1, 2)), kv_cache=cache, return_attn=True)
    assert attns[0].shape == (1, 4, 2, 8)


def test_rope_matches_the_pairwise_rotation() -> None:
    """apply_rope (one expression over q and k heads) == rotating each (x_i, x_i+D/2) pair."""
    from tinyllm.model.positions import apply_rope

    pos = POSITIONS["rope"](tiny(pos="rope", n_embd=64, n_head=4))  # head_dim 16
    x = torch.randn(2, 5, 6, 16)  # (B, T, heads, D)
    y = apply_rope(x, *pos.rope(3, 5))  # positions 3..7
    angles = torch.arange(3, 8.0)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, D/2)
    x1, x2 = x[..., :8], x[..., 8:]
    torch.testing.assert_close(y, torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))


def test_softcap_bounds_logits() -> None:
    model = build(logit_softcap=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        assert model(torch.randint(0, V, (1, 8))).abs().max() <= 0.5


def test_relative_positions_run_past_block_size() -> None:
    for pos in ("rope", "alibi", "none"):
        model = build(pos=pos).eval()
        idx = torch.randint(0, V, (1, 40))  # block_size is 16
        with torch.no_grad():
            full = model(idx)
            cache = model.init_kv_cache(1, max_seq_len=40)
            first = model(idx[:, :30], kv_cache=cache)
            last = model(idx[:, 30:], kv_cache=cache)
        torch.testing.assert_close(torch.cat([first, last], 1), full, **TOL)


def test_dropout_only_in_training() -> None:
    model = build(dropout=0.5)
    idx = torch.randint(0, V, (2, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


# ------------------------------------------------------------------- init and counting


def test_initial_loss_is_about_ln_vocab() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 512, (8, 33))
    with torch.no_grad():
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - math.log(512)) < 0.1


def test_residual_projections_scaled_init() -> None:
    model = GPT(ModelConfig(vocab_size=512, n_layer=8, n_head=4, n_embd=128))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_weight_tying_and_param_counts() -> None:
    tied, untied = build(), build(tie_weights=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == V * 32
    # non-embedding drops wte (and the learned wpe); an untied lm_head still counts.
    assert tied.num_params() - tied.num_params(non_embedding=True) == V * 32 + 16 * 32
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) + V * 32
    assert tied.flops_per_token() > 6 * tied.num_params(non_embedding=True)


def test_param_groups() -> None:
    model = build(qk_norm=True)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = list(model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p is not model.transformer.wte.weight for p in decay["params"])
    with_emb, _ = model.param_groups(0.1, decay_embeddings=True)
    assert any(p is model.transformer.wte.weight for p in with_emb["params"])


def test_gated_mlp_keeps_params_matched() -> None:
    cfg = ModelConfig(n_embd=384, mlp_multiple_of=64)
    gated, plain = mlp_hidden_size(cfg, gated=True), mlp_hidden_size(cfg, gated=False)
    assert plain == 4 * 384 and gated == 1024 and gated % 64 == 0  # 2/3 * 1536 = 1024
    assert 3 * gated == 2 * plain
    a = build(activation="swiglu").transformer.h[0].mlp
    b = build(activation="gelu").transformer.h[0].mlp
    ratio = sum(p.numel() for p in a.parameters()) / sum(p.numel() for p in b.parameters())
    assert 0.95 < ratio < 1.1
    assert mlp_hidden_size(ModelConfig(mlp_hidden=100), gated=True) == 100


def test_buffers_not_in_state_dict() -> None:
    for pos in POSITIONS:
        keys = build(pos=pos).state_dict().keys()
        assert not any(k.split(".")[-1] in ("cos", "sin", "pe", "slopes") for k in keys)


def test_nano_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    for _ in range(80):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(n_embd=30, n_head=4), ["n_embd=30", "n_head=4"]),
        (dict(n_head=4, n_kv_head=3), ["n_kv_head=3"]),
        (dict(n_embd=12, n_head=4, pos="rope"), ["rope", "odd"]),
        (dict(norm="batchnorm"), ["batchnorm", "layernorm, rmsnorm"]),
        (dict(activation="tanh"), ["tanh", "geglu, gelu, relu, relu2, silu, swiglu"]),
        (dict(pos="xpos"), ["xpos", "alibi, learned, none, rope, sinusoidal"]),
        (dict(attn_impl="flash"), ["attn_impl", "sdpa"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(n_layer=0), ["n_layer"]),
        (dict(logit_softcap=0.0), ["logit_softcap"]),
    ],
)
def test_bad_config_fails_at_construction(kw: dict, words: list[str]) -> None:
    with pytest.raises(TinyLLMError) as e:
        GPT(tiny(**kw))
    for w in words:
        assert w in str(e.value)


def test_unknown_config_key() -> None:
    with pytest.raises(TinyLLMError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 3})


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_sequence_longer_than_block_size(pos: str) -> None:
    model = build(pos=pos)
    with pytest.raises(TinyLLMError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.init_kv_cache(1, max_seq_len=32)
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(TinyLLMError, match="block_size=16"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_kv_cache_misuse() -> None:
    model = build(pos="rope")
    cache = model.init_kv_cache(2, max_seq_len=8)
    assert cache.k.shape == (2, 2, 4, 8, 8) and cache.max_seq_len == 8
    with pytest.raises(TinyLLMError, match="batch size 2"):
        model(torch.zeros(3, 4, dtype=torch.long), kv_cache=cache)
    model(torch.zeros(2, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(TinyLLMError, match="full"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)


def test_kv_cache_dtype_follows_autocast() -> None:
    model = build()
    assert model.init_kv_cache(1).k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.init_kv_cache(1)
        assert cache.k.dtype == torch.bfloat16
        full = model(torch.arange(8)[None])
        step = torch.cat(
            [
                model(torch.arange(8)[None, :4], kv_cache=cache),
                model(torch.arange(8)[None, 4:], kv_cache=cache),
            ],
            dim=1,
        )
    assert (full.float() - step.float()).abs().max() < 0.05


def test_sinusoidal_positions_enter_at_the_token_embeddings_scale():
    """Unit-amplitude waves drowned the tokens (std 0.02) 35:1 and trained far worse than no
    positions at all (experiments/pos); the table now has the embeddings' init scale."""
    from tinyllm.model import GPT, ModelConfig

    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32,
                      pos="sinusoidal")  # fmt: skip
    pe = GPT(cfg).pos.pe  # (block_size, n_embd)
    rms = pe.pow(2).mean().sqrt().item()
    assert abs(rms - cfg.init_std) < 0.1 * cfg.init_std, rms


def test_relu2_mlp_is_relu_squared():
    """activation=relu2 computes W2 relu(W1 x)^2, recomputed here from the weights."""
    mlp = build(activation="relu2").transformer.h[0].mlp
    x = torch.randn(2, 5, mlp.c_fc.in_features)
    want = F.linear(F.relu(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)) ** 2,
                    mlp.c_proj.weight, mlp.c_proj.bias)  # fmt: skip
    torch.testing.assert_close(mlp(x), want)
    assert mlp.hidden == 4 * mlp.c_fc.in_features  # ungated: no 2/3 rule


def test_zero_init_proj_makes_every_block_the_identity_and_still_trains():
    model = build(zero_init_proj=True)
    projs = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projs) == 2 * model.config.n_layer
    assert all(bool((p == 0).all()) for p in projs)
    other = [p for n, p in model.named_parameters() if n.endswith("c_fc.weight")]
    assert all(p.std() > 0 for p in other)  # only the output projections are zeroed
    # blocks are the identity (biases start at zero too): logits = head(ln_f(embeddings + pos))
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    x = model.transformer.wte(idx)
    if model.config.pos == "learned":
        x = x + model.pos.wpe(torch.arange(8))
    torch.testing.assert_close(model(idx), model.lm_head(model.transformer.ln_f(x)))
    # the zeros receive gradient, so they leave zero after one step
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projs)
    default = build()
    assert all(p.std() > 0 for n, p in default.named_parameters() if n.endswith("c_proj.weight"))


class _AttentionKernelDtypes(TorchDispatchMode):
    """Records the dtype of the query that each attention kernel (forward and backward)
    actually receives: a dispatch mode sits below autocast, so it sees what really ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "scaled_dot_product" in name:
            kind = "backward" if "backward" in name else "forward"
            q = args[1] if kind == "backward" else args[0]  # backward: (grad_out, q, k, v, ...)
            self.seen.append((kind, q.dtype))
        return func(*args, **(kwargs or {}))


def _attention_dtypes(model: GPT, autocast: bool, grad: bool = True) -> set:
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with _AttentionKernelDtypes() as spy:
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with amp, torch.set_grad_enabled(grad):
            logits = model(idx)
        if grad:
            logits.float().sum().backward()
    return set(spy.seen)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(qk_norm=True),  # layernorm keeps q, k in bf16
        dict(n_kv_head=1),  # GQA/MQA
        dict(qk_norm=True, norm="rmsnorm"),  # q, k come back fp32 from RMSNorm, v stays bf16
    ],
)
def test_cpu_bf16_training_runs_the_attention_kernel_in_fp32(kw: dict) -> None:
    """bf16 training on CPU runs the attention kernels, forward and backward, in fp32 (torch's
    bf16 CPU flash-attention backward is ~8x slower), under bf16-mixed and bf16-true alike;
    without gradients (generation) the bf16 kernel is kept (its forward is fast). (ALiBi's
    float mask takes torch's math path, which autocast already runs in fp32.)"""
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(ModelConfig(**{**cfg, **kw}))
    fp32 = {("forward", torch.float32), ("backward", torch.float32)}
    assert _attention_dtypes(model, autocast=True) == fp32  # bf16-mixed
    assert _attention_dtypes(model, autocast=True, grad=False) == {("forward", torch.bfloat16)}
    assert _attention_dtypes(model.to(torch.bfloat16), autocast=False) == fp32  # bf16-true


def test_cpu_bf16_attention_matches_fp32_attention_and_returns_bf16() -> None:
    import tinyllm.model.attention as attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    alibi = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16)  # an additive float mask
    for mask in (None, alibi):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attention._sdpa(q, k, v, attn_mask=mask, is_causal=mask is None)
        assert y.dtype == torch.bfloat16
        m32 = None if mask is None else mask.float()
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=m32, is_causal=mask is None
        )
        assert torch.equal(y, ref.to(torch.bfloat16))  # the fp32 result, rounded once
        y.float().sum().backward()
        assert q.grad is not None and q.grad.dtype == torch.bfloat16
        q.grad = None
