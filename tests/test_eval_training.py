"""Evaluations during training: the figures in metrics.json and TensorBoard equal what
`tinyllm.evaluate` computes on the checkpoint written at the same step, also under DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from train_utils import TINY, read_metrics, train_cli, train_in_process

from tinyllm.errors import TinyLLMError

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "tasks" / "agreement.jsonl"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("heldout") / "held_out.txt"
    path.write_text(topics[sorted(topics)[-1]][:2000], encoding="utf-8")
    return path


def overrides(corpus: Path, data_root: Path, held_out: Path) -> list[str]:
    return [
        *TINY,
        "data=text",
        f"data.path={corpus}",
        f"data_root={data_root}",
        f"eval.tasks=[{TASK}]",
        f"eval.text={held_out}",
        "eval.every_n_steps=15",
        "sample.max_new_tokens=0",
    ]


def evaluate(ckpt: Path, held_out: Path) -> dict:
    from tinyllm.evaluate import run

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", [f"ckpt={ckpt}", f"tasks=[{TASK}]", f"text={held_out}"])
    return run(cfg)


def check_against_evaluate(run_dir: Path, held_out: Path) -> dict:
    m = read_metrics(run_dir)
    assert [h["step"] for h in m["history"]] == [15, 30]
    for h in m["history"]:
        assert {"eval/agreement/acc", "eval/agreement/acc_norm", "eval/held_out/bpb"} <= set(h)
    res = evaluate(run_dir, held_out)  # ckpt=RUN_DIR: its last.ckpt, saved at step 30
    task = res["tasks"]["agreement"]
    # exact counts; the 1e-7 is Lightning's float32 logging (as for val/bpb)
    assert m["eval/agreement/acc"] == pytest.approx(task["acc"], abs=1e-7)
    assert m["eval/agreement/acc_norm"] == pytest.approx(task["acc_norm"], abs=1e-7)
    assert round(m["eval/agreement/acc"] * 48) == task["correct"]
    assert m["eval/held_out/bpb"] == pytest.approx(res["text"]["total"]["bpb"], rel=1e-6)
    return m


def test_eval_during_training_matches_the_command(corpus, held_out, tmp_path) -> None:
    run_dir = tmp_path / "run"
    train_in_process(overrides(corpus, tmp_path / "data", held_out), run_dir)
    check_against_evaluate(run_dir, held_out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    for tag in ("eval/agreement/acc_norm", "eval/agreement/acc", "eval/held_out/bpb"):
        # at the same steps as val/bpb (Lightning's step index of those validations)
        assert [e.step for e in ea.Scalars(tag)] == [e.step for e in ea.Scalars("val/bpb")]
    assert len(ea.Scalars("eval/held_out/bpb")) == 2


def test_eval_settings_are_checked_before_training(corpus, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" b"], "label": 1}\n')
    with pytest.raises(TinyLLMError, match=f"{bad}:1"):
        train_in_process(
            [*TINY, "data=text", f"data.path={corpus}", f"data_root={tmp_path / 'd'}",
             f"eval.tasks=[{bad}]"], tmp_path / "run",
        )  # fmt: skip


@pytest.mark.ddp
def test_eval_under_ddp_sums_exactly(corpus, held_out, tmp_path) -> None:
    """Two gloo processes each score half the items and windows; the sums equal the command's
    single-process figures on the same checkpoint."""
    args = [*overrides(corpus, tmp_path / "data", held_out), "trainer.devices=2", "logger=none"]
    r = train_cli([*args, f"hydra.run.dir={tmp_path}/two"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_against_evaluate(tmp_path / "two", held_out)
    assert m["devices"] == 2 and math.isfinite(m["eval/held_out/bpb"])


def test_report_shows_eval_columns_mean_std(tmp_path) -> None:
    """eval/* figures of metrics.json become report columns: mean ± std over the seeds."""
    import statistics

    from test_report import make_pos_sweep, metrics_for, write_job

    from tinyllm.analysis import load_sweep, summarize
    from tinyllm.report import build_report

    root = make_pos_sweep(tmp_path / "mr", positions=("learned", "rope"))
    accs = {"learned": [0.50, 0.55, 0.60], "rope": [0.70, 0.72, 0.74]}
    num = 0
    for pos in ("learned", "rope"):
        for seed in range(3):
            job = root / str(num)
            m = metrics_for(2.0 + seed / 10, **{"eval/agreement/acc_norm": accs[pos][seed]})
            (job / "metrics.json").write_text(__import__("json").dumps(m))
            num += 1
    write_job(root, num, ["pos=rope", "seed=3", "trainer.max_steps=100"], None)  # running
    sweep = load_sweep(root)
    result = build_report(sweep, "val/bpb", out_dir=tmp_path / "out")
    header, cells = result["header"], result["cells"]
    col = header.index("eval/agreement/acc_norm (mean ± std)")
    assert header[col - 1] == "val/bpb (mean ± std)"
    for row, pos in zip(cells, ("learned", "rope")):
        mean, std = statistics.mean(accs[pos]), statistics.stdev(accs[pos])
        assert row[col] == f"{mean:.4f} ± {std:.4f}"
    assert summarize(sweep, "val/bpb")[1].n == 3
    assert "eval/agreement/acc_norm" in (tmp_path / "out" / "report.md").read_text()
