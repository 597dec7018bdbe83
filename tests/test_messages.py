"""Messages that used to mislead a newcomer: each now names the fix that applies."""

from __future__ import annotations

import importlib.util

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
