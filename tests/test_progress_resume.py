"""What a run prints (budget, plain progress lines, ETA) and resuming in its own directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from train_utils import TINY, read_metrics, train_cli, train_in_process, write_corpus

from tinyllm.cli import resume_in_place
from tinyllm.errors import TinyLLMError
from tinyllm.progress import Budget, PlainProgress


def test_budget_eta_is_the_limit_that_binds() -> None:
    b = Budget(max_steps=100_000, max_time_s=50.0)
    # 100 steps in 10 s: the steps would take 2.8 h, the clock ends the run in 40 s
    assert b.eta(100, 99_900, 10.0) == (40.0, "time budget")
    fast = Budget(max_steps=200, max_time_s=600.0)
    assert fast.eta(100, 100, 10.0) == (10.0, "steps")  # the steps end it first
    assert Budget(3000).eta(0, 3000, 0.0) == (None, "steps")  # no pace yet
    assert Budget(3000).describe() == "3,000 steps"
    text = Budget(3000, 180.0).describe()
    assert "3,000 steps or 0:03:00 of fitting, whichever comes first" in text
    assert "from step 1,000 to 3,000" in Budget(3000).describe(start_step=1000)


def test_plain_progress_line() -> None:
    p = PlainProgress(Budget(100_000, 50.0), stream=io.StringIO())
    p.clock.start(0)
    p.clock.elapsed = lambda: 10.0  # 10 s since fitting started
    line = p.line(200, {"train/loss": 5.81234, "train/tokens_per_s": 13104.2})
    assert line.startswith("step 200/100,000 | loss 5.8123 | 13,104 tok/s | elapsed 0:00:10")
    assert line.endswith("ETA 0:00:40 (time budget)")


def test_off_a_terminal_training_prints_plain_progress(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    overrides = [*TINY, "data=text", f"data.path={corpus}", f"data_root={tmp_path / 'data'}",
                 "logger=none", "progress_every_s=0"]  # fmt: skip
    train_in_process(overrides, tmp_path / "run")
    out = capsys.readouterr().out  # (pytest's stdout is not a terminal)
    assert "| 30 steps |" in out  # the header line's budget
    assert "step 30/30 | loss " in out and "tok/s" in out and "ETA 0:00:00 (steps)" in out
    assert "validation at step 15: val/loss" in out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    return run


def test_resume_rewrites_the_command_to_continue_in_place(run_dir: Path) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    outputs = run_dir.parents[1]
    assert resume_in_place([f"resume={run_dir}", "trainer.max_steps=9"], outputs) == [
        "--config-dir", str(run_dir / ".hydra"), "--config-name", "config",
        f"hydra.run.dir={run_dir}", f"ckpt_path={last}", "trainer.max_steps=9",
    ]  # fmt: skip
    assert resume_in_place(["resume=latest"], outputs)[4] == f"hydra.run.dir={run_dir}"
    # i15's printed resume command (same overrides + ckpt_path) continues in the same folder
    assert resume_in_place(["model=nano", f"ckpt_path={last}"], outputs) == [
        "model=nano",
        f"ckpt_path={last}",
        f"hydra.run.dir={run_dir}",
    ]
    assert resume_in_place(["ckpt_path=latest"], outputs) == [
        f"ckpt_path={last}",
        f"hydra.run.dir={run_dir}",
    ]
    unchanged = [
        [f"ckpt_path={last}", "hydra.run.dir=elsewhere"],  # the user chose a directory
        ["ckpt_path=/tmp/copied.ckpt"],  # not inside a run directory
        ["-m", f"ckpt_path={last}", "seed=1,2"],  # sweeps keep their own folders
        ["model=nano"],
    ]
    for argv in unchanged:
        assert resume_in_place(argv, outputs) == argv


def test_resume_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(TinyLLMError, match=r"resume=.*nope.*not found.*resume=latest"):
        resume_in_place([f"resume={tmp_path / 'nope'}"], tmp_path)
    with pytest.raises(TinyLLMError, match="ckpt_path=latest found no checkpoints/last.ckpt"):
        resume_in_place(["ckpt_path=latest"], tmp_path)
    with pytest.raises(TinyLLMError, match="sweep"):
        resume_in_place(["-m", "resume=latest"], tmp_path)


@pytest.mark.slow
def test_resume_continues_in_its_own_directory_with_one_history(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    base = [*TINY, "data=text", f"data.path={corpus}", "trainer.enable_progress_bar=false"]
    run = tmp_path / "outputs" / "first"
    r = train_cli([*base, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = train_cli(["resume=latest", "trainer.max_steps=60"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "from step 30 to 60" in r.stdout
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["first"]
    m = read_metrics(run)
    assert m["step"] == 60 and m["status"] == "completed"
    assert [h["step"] for h in m["history"]] == [15, 30, 45, 60]
    times = [h["time_s"] for h in m["history"]]
    assert times == sorted(times)  # wall time continues from the first part
    assert "dirpath has changed" not in r.stderr + r.stdout
    assert json.loads((run / "metrics.json").read_text())["history"][1]["step"] == 30
