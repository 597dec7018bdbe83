"""Helpers for the training tests: a small fixed corpus and ways to run `tinyllm.train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A tiny model on a tiny corpus: seconds per run on one CPU thread.
TINY = [
    "model=nano",
    "tokenizer.vocab_size=320",
    "batch_size=8",
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "trainer.log_every_n_steps=5",
    "trainer.accelerator=cpu",
    "loader.val_windows=16",
    "optim.warmup_steps=5",
    "sample.max_new_tokens=8",
]


def text_run(corpus: Path, data_root: Path) -> list[str]:
    """TINY on a text corpus (the `corpus` fixture), prepared under `data_root`."""
    return [*TINY, "data=text", f"data.path={corpus}", f"data_root={data_root}"]


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    """A fixed ~60 KB corpus taken from Python's bundled documentation (present everywhere)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:n_docs]
    path.mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(keys):
        (path / f"doc{i:03d}.txt").write_text(topics[k][:1500])
    return path


def train_in_process(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Compose the real configs and call `tinyllm.train.run` as `@hydra.main` would."""
    from tinyllm.train import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.overrides.task = list(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg)


def train_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "tinyllm.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def train_one_and_two_processes(common: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Train `common` as 1 process x batch 8 and as 2 gloo processes x batch 4 (the same global
    batch), in tmp_path/one and tmp_path/two; return both runs' metrics.json."""
    one = train_cli([*common, "batch_size=8", f"hydra.run.dir={tmp_path}/one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_cli(
        [*common, "batch_size=4", "trainer.devices=2", f"hydra.run.dir={tmp_path}/two"],
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
