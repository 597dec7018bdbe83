"""tinyllm.report on hand-written Hydra multirun folders: the numbers, the partial sweeps, the
error paths, the plots, the TensorBoard fallback and the power-law fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import ttest_ind

from tinyllm.analysis import fit_power_law, load_sweep, summarize
from tinyllm.errors import TinyLLMError
from tinyllm.report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# final val/bpb per (pos, seed): chosen so the rope-vs-learned gap is clearly significant
FINALS = {
    "learned": [2.10, 2.14, 2.12],
    "rope": [2.00, 2.03, 2.01],
    "alibi": [2.11, 2.09, 2.16],
}


def write_job(
    root: Path,
    num: int,
    overrides: list[str],
    metrics: dict | None,
    hydra_dir: bool = True,
) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"seed": 0, "model": {"pos": "learned", "n_layer": 2}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def metrics_for(final: float, status: str = "completed", params: int = 100_000, **kw) -> dict:
    history = [
        {
            "step": s,
            "tokens": s * 1024,
            "time_s": 0.5 * s,
            "val/loss": (final + 1 / (1 + s)) * 0.7,
            "val/bpb": final + 1.0 / (1 + s),
        }
        for s in (0, 50, 100)
    ]
    m = {
        "status": status,
        "val/loss": final * 0.7,
        "val/bpb": final,
        "val/ppl": 5.0,
        "train/loss": final * 0.7,
        "train/tokens_per_s": 1000.0,
        "params": params,
        "step": 100,
        "tokens": 102400,
        "wall_time_s": 50.0,
        "error": None,
        "history": history,
    }
    m.update(kw)
    return m


def write_multirun(root: Path, task: list[str], params: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "hydra": {
            "mode": "MULTIRUN",
            "sweeper": {"params": params},
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
            "job": {"name": "train"},
        },
        "seed": 0,
    }
    (root / "multirun.yaml").write_text(yaml.safe_dump(cfg))


def make_pos_sweep(root: Path, positions: tuple[str, ...] = ("learned", "rope", "alibi")) -> Path:
    """pos=... seed=0,1,2 in Hydra's order (the last key varies fastest)."""
    write_multirun(root, [f"pos={','.join(positions)}", "seed=0,1,2", "trainer.max_steps=100"])
    num = 0
    for pos in positions:
        for seed in range(3):
            overrides = [f"pos={pos}", f"seed={seed}", "trainer.max_steps=100"]
            write_job(root, num, overrides, metrics_for(FINALS[pos][seed]))
            num += 1
    return root


def test_table_means_std_and_welch(tmp_path: Path) -> None:
    root = make_pos_sweep(tmp_path / "mr")
    sweep = load_sweep(root)
    assert sweep.swept_keys == ["pos"]
    assert sweep.seed_keys == ["seed"]
    assert sweep.fixed == {"trainer.max_steps": "100"}
    assert sweep.expected_jobs == 9
    rows = summarize(sweep, "val/bpb")
    assert [r.label for r in rows] == ["pos=learned", "pos=rope", "pos=alibi"]
    base, rope, alibi = rows
    assert base.is_baseline and base.n == 3 and base.p_value is None
    for row, pos in zip(rows, ("learned", "rope", "alibi")):
        assert row.mean == pytest.approx(np.mean(FINALS[pos]))
        assert row.std == pytest.approx(np.std(FINALS[pos], ddof=1))
        assert row.counts() == {"completed": 3}
        assert row.params == 100_000 and row.tokens_per_s == 1000.0
    assert rope.delta == pytest.approx(np.mean(FINALS["rope"]) - np.mean(FINALS["learned"]))
    expected = ttest_ind(FINALS["rope"], FINALS["learned"], equal_var=False).pvalue
    assert rope.p_value == pytest.approx(expected)
    assert rope.p_value < 0.01
    assert alibi.p_value == pytest.approx(
        ttest_ind(FINALS["alibi"], FINALS["learned"], equal_var=False).pvalue
    )

    # an explicit baseline moves the reference
    rows = summarize(sweep, "val/bpb", baseline="pos=rope")
    assert [r.is_baseline for r in rows] == [False, True, False]
    assert rows[0].delta == pytest.approx(np.mean(FINALS["learned"]) - np.mean(FINALS["rope"]))


def test_cli_writes_report_and_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_pos_sweep(tmp_path / "mr")
    assert main([str(root), "--baseline", "pos=learned"]) == 0
    out = capsys.readouterr().out
    assert "pos" in out and "rope" in out and "2.0133" in out  # the terminal table
    report = (root / "report.md").read_text()
    assert "| pos | params |" in report
    assert "2.1200 ± 0.0200" in report  # learned: mean 2.12, std 0.02
    assert "baseline" in report and "val_bpb_vs_step.png" in report
    assert "val_bpb_vs_time.png" in report
    for name in ("val_bpb_vs_step.png", "val_bpb_vs_time.png"):
        data = (root / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not list(root.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_metric_and_out_options(tmp_path: Path) -> None:
    root = make_pos_sweep(tmp_path / "mr")
    out = tmp_path / "elsewhere"
    assert main([str(root), "--metric", "val/loss", "--out", str(out), "--band", "std"]) == 0
    report = (out / "report.md").read_text()
    assert "val/loss" in report and (out / "val_loss_vs_step.png").is_file()
    assert f"{np.mean(FINALS['rope']) * 0.7:.4f}" in report
    assert not (root / "report.md").exists()


def test_grouping_pools_all_seed_keys_across_two_swept_keys(tmp_path: Path) -> None:
    root = tmp_path / "mr"
    write_multirun(
        root, ["pos=learned,rope", "norm=layernorm,rmsnorm", "data_seed=0,1", "model.init_seed=3,4"]
    )
    num, finals = 0, {}
    for pos in ("learned", "rope"):
        for norm in ("layernorm", "rmsnorm"):
            for ds in (0, 1):
                for s in (3, 4):
                    f = 2.0 + 0.1 * (pos == "rope") + 0.01 * (norm == "rmsnorm") + 0.001 * (ds + s)
                    finals.setdefault((pos, norm), []).append(f)
                    ov = [f"pos={pos}", f"norm={norm}", f"data_seed={ds}", f"model.init_seed={s}"]
                    write_job(root, num, ov, metrics_for(f))
                    num += 1
    sweep = load_sweep(root)
    assert sweep.swept_keys == ["pos", "norm"]
    assert sweep.seed_keys == ["data_seed", "model.init_seed"]
    rows = summarize(sweep, "val/bpb", baseline="norm=rmsnorm,pos=rope")
    assert [dict(r.key) for r in rows] == [
        {"pos": p, "norm": n} for p in ("learned", "rope") for n in ("layernorm", "rmsnorm")
    ]
    assert all(r.n == 4 for r in rows)
    assert rows[3].is_baseline
    for r in rows:
        assert r.mean == pytest.approx(np.mean(finals[tuple(dict(r.key).values())]))


def test_partial_sweep_failed_and_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mr"
    write_multirun(root, ["pos=learned,rope", "seed=0,1,2"])
    write_job(root, 0, ["pos=learned", "seed=0"], metrics_for(2.10))
    write_job(root, 1, ["pos=learned", "seed=1"], metrics_for(2.14))
    write_job(
        root,
        2,
        ["pos=learned", "seed=2"],
        metrics_for(float("nan"), status="failed", error="loss diverged: NaN at step 60"),
    )
    write_job(root, 3, ["pos=rope", "seed=0"], metrics_for(2.01, status="running"))
    write_job(root, 4, ["pos=rope", "seed=1"], None)  # started, no metrics.json yet
    # job 5 (pos=rope seed=2) not started yet
    sweep = load_sweep(root)
    assert sweep.expected_jobs == 6 and len(sweep.runs) == 5
    rows = summarize(sweep, "val/bpb")
    learned, rope = rows
    assert learned.counts() == {"completed": 2, "failed": 1}
    assert learned.n == 2 and learned.mean == pytest.approx(2.12)
    assert rope.counts() == {"running": 2} and rope.n == 0 and rope.mean is None
    assert rope.p_value is None and rope.delta is None

    rows = summarize(sweep, "val/bpb", baseline="pos=rope")  # a baseline with no results
    assert rows[0].delta is None and rows[0].p_value is None
    assert main([str(root), "--baseline", "pos=rope"]) == 0
    assert "has no completed run" in (root / "report.md").read_text()
    capsys.readouterr()

    assert main([str(root)]) == 0
    report = (root / "report.md").read_text()
    assert "5 job(s) of 6 in the sweep" in report
    assert "## Failed runs" in report and "loss diverged: NaN at step 60" in report
    assert "## Running or incomplete runs" in report
    assert "running (no metrics.json)" in report
    assert "2 completed, 1 failed" in report and "2 running" in report
    assert (root / "val_bpb_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    assert "loss diverged" in capsys.readouterr().out


def test_single_seed_gives_na(tmp_path: Path) -> None:
    root = tmp_path / "mr"
    write_multirun(root, ["pos=learned,rope"])
    write_job(root, 0, ["pos=learned"], metrics_for(2.1))
    write_job(root, 1, ["pos=rope"], metrics_for(2.0))
    rows = summarize(load_sweep(root), "val/bpb")
    assert rows[1].std is None and rows[1].p_value is None
    assert rows[1].delta == pytest.approx(-0.1)
    assert main([str(root)]) == 0
    assert "n/a" in (root / "report.md").read_text()


def test_not_a_multirun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert _exit_code([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a Hydra multirun folder" in err and "Traceback" not in err
    assert _exit_code([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a single run folder gets a hint towards its multirun parent
    (tmp_path / "single" / ".hydra").mkdir(parents=True)
    assert _exit_code([str(tmp_path / "single")]) == 2
    assert "single run" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()
    # the date folder above the multirun folders: point at them
    write_multirun(tmp_path / "multirun" / "2026-11-22" / "01-00-00", ["pos=rope"])
    assert _exit_code([str(tmp_path / "multirun")]) == 2
    assert "2026-11-22/01-00-00; pass one of them" in capsys.readouterr().err


def test_no_metrics_anywhere_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mr"
    write_multirun(root, ["pos=learned,rope"])
    write_job(root, 0, ["pos=learned"], None)
    write_job(root, 1, ["pos=rope"], None)
    assert _exit_code([str(root)]) == 2
    err = capsys.readouterr().err
    assert "Nothing to report" in err and "2 running" in err
    assert not (root / "report.md").exists()


def test_unknown_metric_lists_available(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_pos_sweep(tmp_path / "mr")
    assert _exit_code([str(root), "--metric", "val/acc"]) == 2
    err = capsys.readouterr().err
    assert "val/acc" in err and "val/bpb" in err and "--metric" in err


def test_bad_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_pos_sweep(tmp_path / "mr")
    assert _exit_code([str(root), "--baseline", "pos=nope"]) == 2
    assert "matches no configuration" in capsys.readouterr().err
    assert _exit_code([str(root), "--baseline", "norm=rmsnorm"]) == 2
    assert "does not vary" in capsys.readouterr().err
    assert _exit_code([str(root), "--baseline", "rope"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_mixed_sweeps_partial_report(tmp_path: Path) -> None:
    root = make_pos_sweep(tmp_path / "mr", positions=("learned", "rope"))
    # a second sweep (a different swept key) written into the same folder
    write_job(root, 6, ["norm=rmsnorm", "seed=0"], metrics_for(1.9))
    write_job(root, 7, ["bad-entry-not-a-list"], None)
    (root / "7" / ".hydra" / "overrides.yaml").write_text("{not: a list}")
    sweep = load_sweep(root)
    assert len(sweep.runs) == 6 and [r.num for r, _ in sweep.excluded] == [6]
    assert any("mixed, incompatible sweeps" in w for w in sweep.warnings)
    assert any("7" in w and "overrides.yaml" in w for w in sweep.warnings)
    assert main([str(root)]) == 0
    report = (root / "report.md").read_text()
    assert "## Excluded jobs" in report and "norm=rmsnorm" in report
    assert "## Warnings" in report


def test_unreadable_metrics_is_reported(tmp_path: Path) -> None:
    root = make_pos_sweep(tmp_path / "mr", positions=("learned", "rope"))
    (root / "5" / "metrics.json").write_text("{truncated")
    sweep = load_sweep(root)
    assert sweep.runs[5].status == "unreadable"
    assert any("not valid JSON" in w for w in sweep.warnings)
    rows = summarize(sweep, "val/bpb")
    assert rows[1].n == 2 and rows[1].counts() == {"completed": 2, "unreadable": 1}


def test_sweeper_params_declare_swept_keys_before_they_vary(tmp_path: Path) -> None:
    """A study sweep (experiment=...) declares its sweep in hydra.sweeper.params; after its
    first three jobs only the seed has varied, yet `pos` is still a swept column."""
    root = tmp_path / "mr"
    params = {"pos": ["learned", "rope"], "seed": "range(3)"}
    write_multirun(root, ["experiment=pos"], params=params)
    for s in range(3):
        write_job(
            root,
            s,
            ["experiment=pos", "pos=learned", f"seed={s}"],
            metrics_for(FINALS["learned"][s]),
        )
    sweep = load_sweep(root)
    assert sweep.swept_keys == ["pos"] and sweep.fixed == {"experiment": "pos"}
    assert sweep.expected_jobs == 6
    assert sweep.command == "python -m tinyllm.train -m experiment=pos"


def test_curves_from_tensorboard_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path / "mr"
    write_multirun(root, ["pos=learned", "seed=0,1"])
    for seed in (0, 1):
        m = metrics_for(2.0 + 0.1 * seed)
        del m["history"]  # no history: the curve must come from TensorBoard
        job = write_job(root, seed, ["pos=learned", f"seed={seed}"], m)
        writer = SummaryWriter(log_dir=str(job / "tb" / "lightning_logs" / "version_0"))
        for step in (0, 10, 20):
            writer.add_scalar("train/loss", 5.0 - step / 10, step, walltime=1000.0 + step)
            writer.add_scalar("val/bpb", 3.0 - step / 100 + seed, step, walltime=1001.0 + step)
        writer.close()
    sweep = load_sweep(root)
    run = sweep.runs[1]
    assert run.curve_source == "tensorboard"
    assert run.steps == [0, 10, 20]
    assert run.values == pytest.approx([4.0, 3.9, 3.8])
    assert run.times == pytest.approx([1.0, 11.0, 21.0])  # since the run's first event
    assert main([str(root)]) == 0
    assert (root / "val_bpb_vs_time.png").read_bytes()[:8] == PNG_MAGIC


def test_fit_power_law_recovers_parameters() -> None:
    n = np.geomspace(1e5, 3e7, 7)
    a, alpha, c = 40.0, 0.28, 1.4
    fit = fit_power_law(n, a * n**-alpha + c)
    assert fit.method == "curve_fit"
    assert fit.a == pytest.approx(a, rel=1e-3)
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.c == pytest.approx(c, rel=1e-3)
    # noisy seeds around the law: still close
    rng = np.random.default_rng(0)
    nn = np.repeat(n, 3)
    fit = fit_power_law(nn, a * nn**-alpha + c + rng.normal(0, 0.003, nn.size))
    assert fit.alpha == pytest.approx(alpha, rel=0.15)
    assert fit.c == pytest.approx(c, abs=0.05)
    assert float(fit(1e6)) == pytest.approx(a * 1e6**-alpha + c, rel=0.01)


def test_fit_power_law_fallback_and_errors() -> None:
    # two sizes: not enough for three parameters -> log-log line with c = 0, exact for c = 0
    fit = fit_power_law([1e5, 1e5, 1e6], [30 * 1e5**-0.3] * 2 + [30 * 1e6**-0.3])
    assert fit.method == "loglog" and fit.c == 0.0
    assert fit.a == pytest.approx(30.0, rel=1e-6) and fit.alpha == pytest.approx(0.3, rel=1e-6)
    with pytest.raises(TinyLLMError, match="2 or more different parameter counts"):
        fit_power_law([1e5, 1e5], [2.0, 2.1])


def test_scaling_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mr"
    sizes = {"nano": 2e5, "micro": 8e5, "tiny": 3e6, "small": 1.2e7}
    write_multirun(root, [f"model={','.join(sizes)}", "seed=0,1"])
    num = 0
    for name, n in sizes.items():
        for seed in (0, 1):
            loss = 20.0 * n**-0.25 + 1.2 + 0.002 * seed
            write_job(
                root, num, [f"model={name}", f"seed={seed}"], metrics_for(loss, params=int(n))
            )
            num += 1
    assert main([str(root)]) == 0  # auto: the only swept key is `model`
    report = (root / "report.md").read_text()
    assert "## Scaling" in report and "alpha = 0.2" in report
    assert (root / "val_bpb_vs_params.png").read_bytes()[:8] == PNG_MAGIC
    assert "power law" in capsys.readouterr().out
    assert main([str(root), "--no-scaling"]) == 0
    assert "## Scaling" not in (root / "report.md").read_text()


def _exit_code(argv: list[str]) -> int:
    """main() on a user error: one paragraph on stderr and exit code 2 (tinyllm.errors)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code)


def test_key_value_options_match_the_flags(tmp_path, capsys):
    root = make_pos_sweep(tmp_path / "mr")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main([str(root), "--metric", "val/loss", "--out", str(out_a), "--band", "std"]) == 0
    flags = capsys.readouterr().out
    argv = [f"dir={root}", "metric=val/loss", f"out={out_b}", "band=std"]
    assert main(argv) == 0
    assert capsys.readouterr().out.replace(str(out_b), str(out_a)) == flags
    assert (out_a / "report.md").read_text() == (out_b / "report.md").read_text()
    assert _exit_code([str(root), "scaling=maybe"]) == 2
    assert "scaling='maybe'" in capsys.readouterr().err


def test_optimizer_study_summary_recomputes_exactly(tmp_path: Path) -> None:
    """experiments/optimizers/summarize.py: best configuration per optimizer, the delta and the
    Welch p of best-Muon vs best-AdamW from the unrounded finals, the time to a target."""
    # more digits than the summary prints: the test must run on the unrounded figures
    finals = {
        ("adamw", "mid"): [2.273926, 2.265531, 2.280147],
        ("adamw", "hi"): [2.3, 2.31, 2.32],
        ("muon", "mid"): [2.215926, 2.211379, 2.223116],
        ("muon", "hi"): [2.2203, 2.2125, 2.25],
    }
    write_multirun(tmp_path, ["seed=0,1,2", "lr_level=mid,hi", "optim=adamw,muon"])
    for num, ((name, level), values) in enumerate(finals.items()):
        for seed, final in enumerate(values):
            overrides = [f"seed={seed}", f"lr_level={level}", f"optim={name}"]
            m = metrics_for(final, config={"optim": {"name": name, "lr": 1e-3}})
            write_job(tmp_path, num * 3 + seed, overrides, m)
    script = Path(__file__).resolve().parents[1] / "experiments" / "optimizers" / "summarize.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "--target", "2.5"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    got = json.loads(out.stdout)
    a, m = finals[("adamw", "mid")], finals[("muon", "mid")]
    assert got["best_adamw"] == "lr_level=mid, optim=adamw"
    assert got["best_muon"] == "lr_level=mid, optim=muon"
    assert got["delta_muon_minus_adamw"] == round(sum(m) / 3 - sum(a) / 3, 4)
    assert got["welch_p"] == pytest.approx(ttest_ind(m, a, equal_var=False).pvalue, rel=1e-6)
    # metrics_for's curve: bpb = final + 1/(1+step) at steps 0, 50, 100 and times 0, 25, 50 s
    row = next(r for r in got["rows"] if r["config"] == "lr_level=mid, optim=muon")
    final = m[0]
    v0, v1 = final + 1.0, final + 1 / 51  # 2.5 is crossed between the first two validations
    assert row["time_to_target_s"][0] == round(25 * (v0 - 2.5) / (v0 - v1), 1)
    assert row["finals"] == m and row["n"] == 3
