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


def test_ddp_sync_dist_advice_is_silenced_only_for_reduced_val_metrics() -> None:
    import warnings

    from tinyllm.train import _quiet_lightning_logs

    def lightning_advice(name: str) -> str:  # Lightning's words (logger_connector/result.py)
        return (
            f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when logging on "
            "epoch level in distributed setting to accumulate the metric across devices."
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_lightning_logs()
        for name in ("val/loss", "val/ppl", "val/bpb", "val/exact_match", "val/other"):
            warnings.warn(lightning_advice(name), UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [lightning_advice("val/other")]


def test_fsdp_on_a_cpu_talks_about_fsdp(tmp_path: Path) -> None:
    import pytest
    import torch
    from train_utils import TINY, train_in_process

    from tinyllm.errors import TinyLLMError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    # trainer=fsdp also sets accelerator=gpu: its "no GPU" error used to come first
    with pytest.raises(TinyLLMError, match=r"trainer=fsdp\) runs on CUDA GPUs only"):
        train_in_process([*overrides, "trainer=fsdp"], tmp_path / "run")


def test_missing_checkpoint_suggests_the_option_of_the_command(tmp_path: Path) -> None:
    import pytest

    from tinyllm.checkpoint import read_checkpoint
    from tinyllm.errors import TinyLLMError

    with pytest.raises(TinyLLMError) as info:
        read_checkpoint(tmp_path / "x.ckpt", option="ckpt_path")
    assert "ckpt_path=latest" in str(info.value) and "`ckpt=latest`" not in str(info.value)
    with pytest.raises(TinyLLMError, match="`ckpt=latest`"):
        read_checkpoint(tmp_path / "x.ckpt")  # generate's option
    with pytest.raises(TinyLLMError) as info:
        read_checkpoint(tmp_path / "x.ckpt", option="init_from")
    assert "init_from=" in str(info.value) and "latest" not in str(info.value)
