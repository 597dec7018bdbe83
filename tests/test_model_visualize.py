"""Attention maps: the render function on a model, and the command on a saved checkpoint."""

from __future__ import annotations

import pytest
import torch

from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT, ModelConfig
from tinyllm.visualize import attention_maps, render_attention, run

PNG = b"\x89PNG\r\n\x1a\n"


def small(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return GPT(ModelConfig(**{**base, **kw}))


def test_attention_maps_and_render(tmp_path) -> None:
    model = small(n_head=4, n_kv_head=2, pos="rope").train()  # sdpa model: switches to manual
    attns = attention_maps(model, [1, 2, 3, 4, 5])
    assert model.training  # mode restored
    assert len(attns) == 2 and attns[0].shape == (4, 5, 5)
    torch.testing.assert_close(attns[1].sum(-1), torch.ones(4, 5))
    out = render_attention(attns, list("abcde"), tmp_path / "sub" / "a.png", heads=[0, 3])
    assert out.read_bytes()[:8] == PNG
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]  # no temp file left
    with pytest.raises(TinyLLMError, match="valid indices 0..1"):
        render_attention(attns, list("abcde"), tmp_path / "b.png", layers=[2])


def test_command_on_checkpoint(tmp_path) -> None:
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer.train("the cat sat on the mat. " * 20, vocab_size=270)
    model = small(vocab_size=tok.vocab_size, block_size=8)
    save_checkpoint(tmp_path / "m.ckpt", model, tok)
    # Longer than block_size: the last block_size tokens are shown.
    out = run(str(tmp_path / "m.ckpt"), "the cat sat on the mat\nthe cat", str(tmp_path / "x.png"))
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(TinyLLMError, match="empty"):
        run(str(tmp_path / "m.ckpt"), "", str(tmp_path / "y.png"))
