"""Hydra's own config errors (typos in overrides) -> one paragraph, exit code 2 (tinyllm/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tinyllm.cli import CONF_DIR, _overrides, config_error_message

REPO = Path(__file__).resolve().parents[1]


def _message(config_name: str, overrides: list[str]) -> str:
    """The paragraph for the error Hydra raises when composing these overrides."""
    with (
        initialize_config_dir(str(CONF_DIR), version_base="1.3"),
        pytest.raises(Exception) as info,
    ):
        compose(config_name, overrides=overrides)
    return config_error_message(info.value, config_name, overrides)


@pytest.mark.parametrize(
    "config, overrides, expected",
    [
        ("train", ["norm=rmsnrom"], ["`norm=rmsnrom`", "layernorm, rmsnorm", "`norm=rmsnorm`?"]),
        ("train", ["experiment=quickstrat"], ["experiments/quickstrat.yaml", "quickstart`?"]),
        ("train", ["optim.lrr=1"], ["`optim` has no key `lrr`", "`optim.lr`?", "+optim."]),
        ("train", ["data=text", "data.pth=x"], ["`data` has no key `pth`", "`data.path`?"]),
        ("train", ["nrom=rmsnorm"], ["no key `nrom`", "Did you mean `norm`?"]),
        ("generate", ["temprature=0"], ["generate config has no key", "`temperature`?"]),
        ("generate", ["norm=rmsnorm"], ["generate config has no key `norm`", "prompt"]),
        ("prepare", ["data=txt"], ["`data=txt`", "`data=text`?"]),
        ("export", ["dtyp=bf16"], ["export config has no key `dtyp`", "`dtype`?"]),
        ("visualize", ["promt=hi"], ["visualize config has no key `promt`", "`prompt`?"]),
        ("train", ["model=["], ["`model=[` is not a valid override"]),
        ("inspect", ["stpe=3"], ["inspect config has no key `stpe`", "`step`?"]),
    ],
)  # fmt: skip
def test_config_errors_name_the_option_the_choices_and_the_closest_match(
    config: str, overrides: list[str], expected: list[str]
) -> None:
    msg = _message(config, overrides)
    assert "\n" not in msg  # one paragraph
    for part in expected:
        assert part in msg, (part, msg)


def test_deleting_a_missing_key_does_not_suggest_adding_it() -> None:
    msg = _message("train", ["~nrom"])
    assert "no key `nrom`" in msg and "+nrom" not in msg


def test_overrides_skip_flags_and_their_values() -> None:
    argv = ["-m", "--config-name", "x=y", "norm=rmsnorm", "--cfg", "job", "a.b=1"]
    assert _overrides(argv) == ["norm=rmsnorm", "a.b=1"]


def test_entry_point_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tinyllm.train", "norm=rmsnrom"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: `norm=rmsnrom`"), proc.stderr
    assert "Did you mean `norm=rmsnorm`?" in lines[0]
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was started
