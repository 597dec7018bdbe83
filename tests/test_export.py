"""Export to Hugging Face: transformers' Llama / GPT-2 load our directory, same logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tinyllm.errors import TinyLLMError
from tinyllm.export import export_hf, hf_family, run
from tinyllm.model import GPT, ModelConfig

transformers = pytest.importorskip("transformers")

V = 96


def llama(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_embd=32,
        norm="rmsnorm",
        activation="swiglu",
        pos="rope",
        bias=False,
        rope_theta=500.0,
        norm_eps=1e-6,
    )
    return ModelConfig(**{**base, **kw})


def gpt2(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


def randomized(config: ModelConfig) -> GPT:
    """A model whose every weight (norm gains and biases too) is random, so a wrong mapping
    cannot hide behind an init of ones/zeros."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def compare(model: GPT, out_dir, shapes=((1, 1), (2, 7), (3, 16))) -> None:
    export_hf(model, None, out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    expected = "LlamaForCausalLM" if model.config.pos == "rope" else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected
    for B, T in shapes:
        idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(B * T))
        with torch.no_grad():
            ours, theirs = model(idx), hf(idx).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-4, (B, T)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # MHA
        dict(n_kv_head=2),  # GQA
        dict(n_kv_head=1, tie_weights=False),  # MQA, untied head
        dict(bias=True, n_kv_head=2),  # attention_bias / mlp_bias
        dict(mlp_hidden=40, n_head=2),  # explicit hidden size, head_dim 16
    ],
)
def test_llama_parity(kw: dict, tmp_path) -> None:
    compare(randomized(llama(**kw)), tmp_path)


@pytest.mark.parametrize(
    "kw", [dict(), dict(tie_weights=False), dict(bias=False), dict(mlp_hidden=48, n_head=2)]
)
def test_gpt2_parity(kw: dict, tmp_path) -> None:
    compare(randomized(gpt2(**kw)), tmp_path)


@pytest.mark.parametrize("config", [llama(n_kv_head=2), gpt2()])
def test_hf_greedy_generate_matches_our_kv_cache(config: ModelConfig, tmp_path) -> None:
    model = randomized(config)
    export_hf(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        cache, ids = model.init_kv_cache(1), prompt
        logits = model(prompt, kv_cache=cache)
        for _ in range(8):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(nxt, kv_cache=cache)
    assert ids.tolist() == theirs.tolist()


def test_tokenizer_and_dtype(tmp_path) -> None:
    from tinyllm.tokenizer import BPETokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 20
    tok = BPETokenizer.train(text, vocab_size=270)
    model = GPT(llama(vocab_size=tok.vocab_size))
    export_hf(model, tok, tmp_path, dtype=torch.bfloat16)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary files left behind
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    s = "the lazy fox, quickly!"
    assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.eos_token_id == tok.eos_id
    assert next(hf.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw, part",
    [
        (dict(pos="alibi"), "pos=alibi"),
        (dict(activation="gelu"), "activation=gelu"),  # rope + rmsnorm + gelu: Llama-like
        (dict(qk_norm=True), "qk_norm"),
        (dict(logit_softcap=30.0), "logit_softcap"),
        (dict(pos="learned", norm="layernorm", activation="gelu", n_kv_head=2), "n_kv_head=2"),
        (dict(pos="sinusoidal", norm="layernorm", activation="gelu"), "pos=sinusoidal"),
        (dict(post_norm=True), "post_norm"),
    ],
)
def test_refuses_non_standard_architectures(kw: dict, part: str, tmp_path) -> None:
    config = llama(**kw)
    with pytest.raises(TinyLLMError, match="no standard equivalent") as e:
        hf_family(config)
    assert part in str(e.value)
    with pytest.raises(TinyLLMError):
        export_hf(GPT(config), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_cli_from_checkpoint(tmp_path) -> None:
    from tinyllm import load_checkpoint
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer.train("hello world, hello there. " * 10, vocab_size=262)
    model = randomized(gpt2(vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "m.ckpt", model, tok)
    run(str(tmp_path / "m.ckpt"), str(tmp_path / "hf"))
    loaded, _ = load_checkpoint(str(tmp_path / "m.ckpt"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        assert (loaded(idx) - hf(idx).logits).abs().max().item() < 1e-4
    # The Hydra entry point: a user mistake is one line on stderr and exit code 2.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyllm.export",
            f"ckpt={tmp_path / 'nope.ckpt'}",
            f"out={tmp_path / 'x'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
