"""A real tinyllm server on a free loopback port, in a thread of the test process (so tests can
look at its engine), and the tiny model + tokenizer + chat template it serves."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from tinyllm.model import GPT, ModelConfig
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


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from tinyllm.serve import bind

        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
