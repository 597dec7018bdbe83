"""Shared pieces of the GGUF tests: a tokenizer trained on mixed text, random models, and the
hidden texts the tokenizers must agree on."""

from __future__ import annotations

import torch

from tinyllm.model import GPT, ModelConfig
from tinyllm.tokenizer import BPETokenizer

# Texts never seen in training: unicode, whitespace runs, digits, code, contractions.
HIDDEN_TEXTS = [
    "Héllo wörld! Ça va? Ünïcödé naïve café – “quotes” …",
    "日本語のテキストと中文字符，한국어 텍스트 and ελληνικά, русский.",
    "emoji 😀👍🏽 and combining e\u0301 a\u0300, zero\u200bwidth, nbsp\u00a0here",
    "a  b   c    d\t\te\n\nf\n\n\n  g   \n\t \n trailing   ",
    "   leading spaces and\r\nwindows\r\nline ends\r\n\r\n",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000 2026-12-03 0x1F 1e-3",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { y[i] = a*x[i] + b; }  // C\nif x != None: print(f"{x!r}")',
    "I'm sure you'll see we've done it; they'd say I'LL, DON'T, We'Re 's 't",
    "!!!??? ... --- ___ ``` <<<>>> @@ ## $$ %% ^^ && ** (( )) [] {} || \\\\ //",
    "<|eos|> is text here, not a special token <|bos|>",
    "",
    " ",
    "\n",
    "x",
]


def corpus() -> str:
    """Mixed training text (Python's bundled docs: prose + code) plus a few scripts."""
    from pydoc_data.topics import topics

    text = "".join(topics[k][:3000] for k in sorted(topics)[:60])
    extra = "Émile a dit: «ça coûte 12,50 €». 東京は大きい。 Привет, мир! 1234 5678\n\n\t\t"
    return text + extra * 20


def trained_tokenizer(pattern: str, vocab_size: int = 600) -> BPETokenizer:
    return BPETokenizer.train(corpus(), vocab_size=vocab_size, pattern=pattern)


def llama_config(vocab_size: int, **kw) -> ModelConfig:
    base = dict(
        vocab_size=vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        norm="rmsnorm",
        activation="swiglu",
        pos="rope",
        bias=False,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    return ModelConfig(**{**base, **kw})


def gpt2_config(vocab_size: int, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64)
    return ModelConfig(**{**base, **kw})


def randomized(config: ModelConfig, scale: float = 0.2, seed: int = 0) -> GPT:
    """Every weight random (norm gains and biases too), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
