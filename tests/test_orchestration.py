"""The wiring around training: one data protocol, one error handler, atomic files, metric names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.io import (
    atomic_write,
    sha256_file,
    strip_compile_prefix,
    unwrap_compiled,
    write_json_atomic,
)
from tinyllm.module import LitGPT, selection_metric

REPO = Path(__file__).resolve().parents[1]
MICRO = {"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


# ------------------------------------------------------------------------------------ io
def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"a": torch.tensor(1.5), "b": float("inf")})
    assert path.read_text() == '{\n  "a": 1.5,\n  "b": "Infinity"\n}\n'  # strict JSON

    def broken(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text().startswith('{\n  "a"')  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_compile_prefix_is_stripped_in_one_place() -> None:
    sd = {"model._orig_mod.lm_head.weight": 1, "model.wte.weight": 2}
    assert strip_compile_prefix(sd) == {"model.lm_head.weight": 1, "model.wte.weight": 2}
    inner = torch.nn.Linear(2, 2)
    assert unwrap_compiled(inner) is inner
    wrapper = torch.nn.Module()
    wrapper._orig_mod = inner
    assert unwrap_compiled(wrapper) is inner


# -------------------------------------------------------------------------------- errors
def test_one_handler_exits_2_or_reports_and_goes_on(capsys) -> None:
    seen: list[str] = []
    with pytest.raises(SystemExit) as e, exit_on_user_error(on_error=seen.append):
        raise TinyLLMError("data.path=x is not a file. Fix: point it at one.")
    assert e.value.code == 2 and seen == ["data.path=x is not a file. Fix: point it at one."]
    assert capsys.readouterr().err == "error: data.path=x is not a file. Fix: point it at one.\n"
    with exit_on_user_error(exit=False):  # one job of a sweep: reported, the sweep goes on
        raise TinyLLMError("bad")
    assert capsys.readouterr().err == "error: bad\n"
    with pytest.raises(KeyError), exit_on_user_error():  # a bug keeps its traceback
        raise KeyError("x")


# -------------------------------------------------------------------------- data protocol
def test_every_data_config_names_a_builder_of_the_protocol() -> None:
    from hydra.utils import get_method

    for f in sorted((REPO / "conf" / "data").glob("*.yaml")):
        target = yaml.safe_load(f.read_text())["_target_"]
        builder = get_method(target)
        assert builder.__name__ == "from_config", f
        cls = builder.__self__
        for name in ("chat_template", "check_compatible", "callbacks"):  # (+ .tokenizer, .meta)
            assert hasattr(cls, name), (f, name)


# -------------------------------------------------------------------------- metric names
def _validate(meta: dict | None) -> dict[str, float]:
    lit = LitGPT(MICRO, data_meta=meta)
    logged: dict[str, float] = {}
    lit.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    lit._val_sums = torch.tensor([20.0, 10.0], dtype=torch.float64)  # [nll sum, tokens]
    lit.on_validation_epoch_end()
    return logged


def test_bpb_is_bits_per_byte_or_absent() -> None:
    meta = {"splits": {"val": {"tokens": 10, "bytes": 40}}}
    with_bytes = _validate(meta)
    assert math.isclose(with_bytes["val/bpb"], 2.0 / math.log(2) * 10 / 40, rel_tol=1e-6)
    assert "val/bits_per_token" not in with_bytes and selection_metric(meta) == "val/bpb"
    for unknown in (None, {"splits": {"val": {"tokens": 10, "bytes": 0}}}, {"splits": {}}):
        logged = _validate(unknown)
        assert "val/bpb" not in logged
        assert math.isclose(logged["val/bits_per_token"], 2.0 / math.log(2), rel_tol=1e-6)
        assert selection_metric(unknown) == "val/bits_per_token"
