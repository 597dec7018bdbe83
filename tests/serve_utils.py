"""A real tinyllm server on a free loopback port, in a thread of the test process (so tests can
look at its engine), and the tiny model + tokenizer + chat template it serves."""

from __future__ import annotations

from typing import Any

import torch

from tinyllm.model import GPT, ModelConfig
from tinyllm.serve import BackgroundServer
from tinyllm.tokenizer import BPETokenizer

TEXT = (
    "Question: Who are you?\nAnswer: I am a tiny model.\n"
    "Question: What is two plus two?\nAnswer: Four. 😀 héllo wörld\n"
    "ROMEO: But soft, what light through yonder window breaks?\n"
) * 20
CHAT_TEMPLATE = {"user_prefix": "Q: "}


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, pos="rope",
        norm="rmsnorm", activation="swiglu", bias=False,
    )  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper than the init: answers of varied length, some EOS
        for p in model.parameters():
            p.mul_(4.0)
    return model


def tiny_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 300)


class LiveServer(BackgroundServer):
    """The server in a thread of the test process, with its engine at hand for the tests."""

    engine: Any = None
