"""Messages that used to mislead a newcomer: each now names the fix that applies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tinyllm.data.prepare import no_text_message
from tinyllm.data.sources import ScanResult
from tinyllm.export import load_hint


def test_empty_corpus_does_not_suggest_the_default_policy() -> None:
    # only empty and binary files: they are skipped whatever data.bad_files says
    res = ScanResult(empty=["a.txt"], binary=["b.bin"])
    msg = no_text_message(res, "replace")
    assert "data.bad_files=replace reads" not in msg and "point data.path" in msg
    assert "1 empty, 1 binary, 0 non-UTF-8" in msg


def test_skipped_non_utf8_files_suggest_replace() -> None:
    res = ScanResult(bad_utf8=["latin1.txt"], skipped={"latin1.txt"})
    for policy in ("skip", "error"):
        assert "data.bad_files=replace reads the non-UTF-8" in no_text_message(res, policy)


def test_export_says_how_to_install_transformers(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a)
    )
    hint = load_hint("hf_model")
    assert "from_pretrained('hf_model')" in hint and "pip install -e '.[hf]'" in hint
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    assert "pip install" not in load_hint("hf_model")  # installed: nothing to add


def test_sliding_window_warning_is_said_once_after_the_text(tmp_path, monkeypatch, capsys) -> None:
    import io
    import sys

    import torch
    from hydra import compose, initialize_config_dir

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.generate import run
    from tinyllm.model import GPT, ModelConfig
    from tinyllm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(
        "ROMEO: But soft, what light through yonder window breaks?\n" * 20, 280
    )
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, GPT(cfg).eval(), tok)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        gen_cfg = compose("generate", overrides=[f"ckpt={path}", "prompt=ROMEO:",
                                                 "max_new_tokens=60", "seed=0"])  # fmt: skip
    run(gen_cfg)  # 60 new tokens from a 16-token context: the window slides
    text = capsys.readouterr().out
    both = io.StringIO()  # a terminal: stdout and stderr interleave in one stream
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    run(gen_cfg)
    seen = both.getvalue()
    assert seen.startswith(text)  # the whole text first, uninterrupted
    rest = seen[len(text) :]
    assert rest.count("sliding window") == 1 and rest.startswith("warning: Generation reached")
