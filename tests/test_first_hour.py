"""The newcomer's first commands, as configured: make help, the quickstart's budgets, the Q&A
walkthrough's settings (the ones the README's measured figures were obtained with)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tinyllm.train  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_quickstart_has_a_clock_beside_its_steps() -> None:
    cfg = _compose("experiment=quickstart")
    assert cfg.trainer.max_steps == 3000 and cfg.budget.max_time_s == 180


def test_qa_walkthrough_settings_are_the_measured_ones() -> None:
    cfg = _compose("experiment=qa")
    assert (REPO / cfg.data.path).is_file()
    assert cfg.model.n_embd == 32 and cfg.optim.lr == 3e-3 and cfg.trainer.max_steps == 600
    ft = _compose("experiment=qa_finetune", "init_from=x.ckpt")
    optim = OmegaConf.to_container(ft.optim, resolve=True)
    assert (optim["lr"], optim["min_lr"], ft.trainer.max_steps) == (1e-3, 1e-4, 400)
    assert ft.model.n_embd == 128  # the quickstart's micro model, as init_from requires


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_shows_how_to_pass_args() -> None:
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout
    assert 'make train ARGS="model=tiny"' in out and "make train" in out
