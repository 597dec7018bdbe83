"""Run-health telemetry, spike detection and the batch inspector (tinyllm/health.py, inspect.py).

Every logged figure is checked against a recomputation by hand from the weights, gradients
and activations captured independently in the test.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import (
    TINY,
    read_metrics,
    train_in_process,
    train_one_and_two_processes,
    write_corpus,
)

import tinyllm.health as health
from tinyllm.errors import TinyLLMError
from tinyllm.health import HealthConfig, SpikeDetector, activation_stats, grouped_rms, layer_name
from tinyllm.model import GPT, ModelConfig

SHORT = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check"))] + [
    "trainer.max_steps=12",
    "trainer.val_check_interval=12",
    "sample.max_new_tokens=0",
    "health.spike_min_history=4",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("health") / "corpus")


def _overrides(corpus: Path, *extra: str) -> list[str]:
    return [
        *SHORT,
        "data=text",
        f"data.path={corpus}",
        f"data_root={corpus.parent / 'data'}",
        *extra,
    ]


def _toy() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, z_loss=1e-4)
    return GPT(cfg)


# --------------------------------------------------------------------------- pure pieces


def test_layer_names() -> None:
    assert layer_name("transformer.h.3.attn.c_attn.weight", 12) == "block_03"
    assert layer_name("transformer.h.3.mlp.c_fc.bias", 4) == "block_3"
    assert layer_name("transformer.wte.weight", 4) == "embed"
    assert layer_name("pos.wpe.weight", 4) == "embed"
    assert layer_name("transformer.ln_f.weight", 4) == "ln_f"
    assert layer_name("lm_head.weight", 4) == "head"


def test_grouped_rms_equals_hand_computation() -> None:
    torch.manual_seed(1)
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]
    got = grouped_rms(ts, ["a", "b", "a"])
    a = torch.cat([ts[0].flatten(), ts[2].flatten()]).double()
    assert got["a"] == pytest.approx(float(a.pow(2).mean().sqrt()), rel=1e-6)
    assert got["b"] == pytest.approx(float(ts[1].double().pow(2).mean().sqrt()), rel=1e-6)


def test_activation_stats_equal_hand_computation() -> None:
    from tinyllm.visualize import attention_maps

    model = _toy().eval()
    ids = torch.randint(0, 50, (2, 16))
    got = activation_stats(model, ids)
    with torch.no_grad():  # the residual stream, block by block, by hand
        x = model.pos.embed(model.transformer.wte(ids), 0)
        rope = model.pos.rope(0, 16)
        for i, block in enumerate(model.transformer.h):
            x, _ = block(x, rope, None, None, False)
            assert got[f"health/resid_rms/block_{i}"] == pytest.approx(
                float(x.pow(2).mean().sqrt()), rel=1e-5
            )
        logits = model(ids)
    for i in range(3):  # entropy from the visualiser's maps, row by row
        ent = [
            -(a * torch.log(a.clamp_min(1e-30))).sum(-1).mean()
            for a in (attention_maps(model, ids[b].tolist())[i] for b in range(2))
        ]
        want = float(sum(ent) / 2)
        assert got[f"health/attn_entropy/block_{i}"] == pytest.approx(want, rel=1e-5)
    assert got["health/max_abs_logit"] == pytest.approx(float(logits.abs().max()), rel=1e-6)
    z = 1e-4 * float(torch.logsumexp(logits, -1).pow(2).mean())
    assert got["health/z_loss"] == pytest.approx(z, rel=1e-5)


def test_attention_entropy_bounds() -> None:
    uniform = torch.full((1, 1, 1, 8), 1 / 8)
    one_hot = torch.zeros(1, 1, 1, 8)
    one_hot[..., 3] = 1.0
    assert health.attention_entropy(uniform) == pytest.approx(math.log(8), rel=1e-6)
    assert health.attention_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)


def test_spike_detector_flags_the_spike_only() -> None:
    det = SpikeDetector(window=20, threshold=6.0, min_history=5)
    series = [3.0 - 0.01 * i + 0.005 * math.sin(i) for i in range(40)]
    series[30] = 6.0
    flagged = [i for i, v in enumerate(series) if det.update(v) is not None]
    assert flagged == [30]
    assert 6.0 not in det.values  # a spike stays out of the history
    assert det.update(float("nan")) == math.inf


def test_grad_norm_detector_works_on_a_log_scale() -> None:
    """A norm doubling (as healthy early training does) is no spike; a 100x jump is."""
    series = [1.0, 0.8, 1.25, 0.9, 1.1, 1.0, 0.85, 1.2, 0.95, 1.05] * 3
    det = SpikeDetector(window=50, threshold=6.0, min_history=20, log_scale=True)
    assert all(det.update(v) is None for v in series)
    assert det.update(2.0) is None
    z = det.update(100.0)
    logs = [math.log(v) for v in [*series, 2.0]]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    assert z == pytest.approx((math.log(100.0) - mean) / std)


def test_spike_detector_needs_history() -> None:
    det = SpikeDetector(window=10, threshold=3.0, min_history=5)
    assert [det.update(v) for v in (1.0, 100.0, 1.0, 1.0)] == [None] * 4


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"every_n_step": 5}, r"Unknown health option.*every_n_step"),
        ({"every_n_steps": 0}, r"every_n_steps=0 must be a positive"),
        ({"on_spike": "stop"}, r"on_spike='stop'"),
        ({"spike_threshold": -1}, r"spike_threshold=-1"),
    ],
)
def test_bad_health_options(bad: dict, match: str) -> None:
    with pytest.raises(TinyLLMError, match=match):
        HealthConfig.from_dict(bad)


# --------------------------------------------------------------------------- in a real run


class _Spy(health.HealthMonitor):
    """The real callback, plus an independent record of weights, gradients and its logs."""

    weights: dict[int, list[torch.Tensor]]
    grads: dict[int, list[torch.Tensor]]
    logged: list[tuple[int, dict[str, float]]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights = getattr(self, "weights", {})
        ps = list(pl_module.model.parameters())
        self.weights[trainer.global_step] = [p.detach().clone() for p in ps]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = getattr(self, "grads", {})
        ps = list(pl_module.model.parameters())
        self.grads[trainer.global_step] = [p.grad.detach().clone() for p in ps]
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _log(self, trainer, metrics, step) -> None:  # type: ignore[override]
        self.logged = getattr(self, "logged", [])
        self.logged.append((step, dict(metrics)))
        super()._log(trainer, metrics, step)


@pytest.mark.parametrize(
    "accum, clip",
    [(1, "1.0"), (2, "1.0"), (1, "null")],  # null: the norm is not the clipping pass's
)
def test_logged_layer_figures_equal_recomputation(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accum: int, clip: str
) -> None:
    spies: list[_Spy] = []

    def make(cfg):
        spies.append(_Spy(cfg))
        return spies[-1]

    monkeypatch.setattr(health, "HealthMonitor", make)
    ov = _overrides(
        corpus,
        "health.every_n_steps=5",
        f"trainer.accumulate_grad_batches={accum}",
        f"trainer.gradient_clip_val={clip}",
    )
    train_in_process(ov, tmp_path / "run")
    spy = spies[0]
    steps = sorted(s for s, m in spy.logged if "health/update_ratio/embed" in m)
    assert steps == [0, 5, 10]
    names = [n for n, _ in _named(tmp_path / "run")]
    groups = [layer_name(n, 2) for n in names]
    for step in steps:
        logged = next(m for s, m in spy.logged if s == step and "health/grad_rms/embed" in m)
        before, after, grad = spy.weights[step], spy.weights[step + 1], spy.grads[step]
        for g in set(groups):
            idx = [i for i, gg in enumerate(groups) if gg == g]

            def rms(ts, idx=idx):
                flat = torch.cat([ts[i].flatten().double() for i in idx])
                return float(flat.pow(2).mean().sqrt())

            upd = rms([a - b for a, b in zip(after, before)])
            assert logged[f"health/param_rms/{g}"] == pytest.approx(rms(before), rel=1e-5)
            assert logged[f"health/grad_rms/{g}"] == pytest.approx(rms(grad), rel=1e-5)
            assert logged[f"health/update_ratio/{g}"] == pytest.approx(upd / rms(before), rel=1e-4)
    m = read_metrics(tmp_path / "run")["health"]
    assert m["last"]["step"] == 10
    assert m["last_layer_update_ratio"] == m["last"]["health/update_ratio/block_1"]
    # the max grad norm of the spike detector is the max over every step's pre-clip norm
    norms = [
        float(torch.linalg.vector_norm(torch.stack([g.norm() for g in spy.grads[s]])))
        for s in sorted(spy.grads)
    ]
    assert m["max_grad_norm"] == pytest.approx(max(norms), rel=1e-5)
    assert m["spike_count"] == 0 and m["spikes"] == []


def _named(run_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from tinyllm.checkpoint import model_from_checkpoint, read_checkpoint

    model = model_from_checkpoint(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    return list(model.named_parameters())


def _force_spike(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Multiply the training loss (and so every gradient) by 1e4 at one step."""
    from tinyllm.module import LitGPT

    original = LitGPT.training_step

    def spiky(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * 1e4 if self.global_step == at_step else loss

    monkeypatch.setattr(LitGPT, "training_step", spiky)


def test_forced_spike_is_detected_and_skip_equals_a_run_without_that_step(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ov = _overrides(corpus, "health.every_n_steps=null")
    # the reference: a run whose step 9 update is dropped on purpose, with no spike
    train_in_process([*ov, "health.skip_steps=[9]"], tmp_path / "ref")
    _force_spike(monkeypatch, 9)
    train_in_process([*ov, "health.on_spike=skip"], tmp_path / "skip")
    train_in_process([*ov, "health.on_spike=warn"], tmp_path / "warn")

    skip = read_metrics(tmp_path / "skip")["health"]
    assert [s["step"] for s in skip["spikes"]] == [9]
    assert skip["spikes"][0]["action"] == "skip" and skip["spikes"][0]["z_grad_norm"] > 6
    assert skip["skipped_steps"] == [9]
    warn = read_metrics(tmp_path / "warn")["health"]
    assert [s["step"] for s in warn["spikes"]] == [9] and warn["skipped_steps"] == []

    ref, skipped, kept = (dict(_named(tmp_path / r)) for r in ("ref", "skip", "warn"))
    for name in ref:
        assert torch.equal(ref[name], skipped[name]), name
    assert any(not torch.equal(ref[n], kept[n]) for n in ref)


def test_inspect_prints_the_batch_of_a_step(corpus: Path, tmp_path: Path) -> None:
    from tinyllm.data.datamodule import TrainBatches
    from tinyllm.tokenizer import BPETokenizer

    train_in_process(_overrides(corpus, "health.every_n_steps=null"), tmp_path / "run")
    src = read_metrics(tmp_path / "run")["health"]["batches"]
    out = _inspect(f"run={tmp_path / 'run'}", "step=7")
    assert out.returncode == 0, out.stderr
    # the same windows, drawn and decoded independently
    ds = TrainBatches(
        Path(src["data_dir"]) / "train.bin",
        src["dtype"],
        src["block_size"],
        src["batch_size"],
        seed=src["seed"],
    )
    tok = BPETokenizer.load(Path(src["data_dir"]) / "tokenizer.json")
    x, y = ds[7]
    for i in range(8):
        text = tok.decode(torch.cat([x[i], y[i, -1:]]).tolist())
        assert f"## rank 0, micro-batch 0, row {i} " in out.stdout
        assert text in out.stdout
    one = _inspect(f"run={tmp_path / 'run'}", "step=7", "row=3")
    assert one.stdout.count("## rank") == 1


@pytest.mark.parametrize(
    "args, match",
    [
        (["step=99"], r"step=99 is not a valid step of this run \(12 steps done\)"),
        (["step=-1"], r"step=-1 is not a valid step"),
        (["step=2", "row=8"], r"row=8 is not a valid row"),
        ([], r"Say which step"),
    ],
)
def test_inspect_bad_input(corpus: Path, tmp_path_factory, args: list[str], match: str) -> None:
    run_dir = tmp_path_factory.getbasetemp() / "inspect_bad_run"
    if not (run_dir / "metrics.json").exists():
        train_in_process(_overrides(corpus, "health.every_n_steps=null"), run_dir)
    out = _inspect(f"run={run_dir}", *args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    import re

    assert re.search(match, out.stderr), out.stderr


def test_inspect_needs_a_run_dir(tmp_path: Path) -> None:
    out = _inspect(f"run={tmp_path}", "step=0")
    assert out.returncode == 2 and "holds no metrics.json" in out.stderr


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyllm.inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_shows_health_columns(tmp_path: Path) -> None:
    import numpy as np
    from test_report import metrics_for, write_job, write_multirun

    from tinyllm.analysis import load_sweep, summarize
    from tinyllm.report import table_rows

    root = tmp_path / "mr"
    write_multirun(root, ["optim.lr=1e-3,1e-2", "seed=0,1"])
    figures = {"1e-3": [(1.5, 0, 0.01), (1.7, 0, 0.012)], "1e-2": [(9.0, 2, 0.05), (12.0, 3, 0.07)]}
    num = 0
    for lr, per_seed in figures.items():
        for seed, (gn, spikes, ratio) in enumerate(per_seed):
            h = {"max_grad_norm": gn, "spike_count": spikes, "last_layer_update_ratio": ratio}
            m = metrics_for(2.0 + num * 0.01, health=h)
            write_job(root, num, [f"optim.lr={lr}", f"seed={seed}"], m)
            num += 1
    sweep = load_sweep(root)
    header, rows = table_rows(sweep, summarize(sweep, "val/bpb"), "val/bpb")
    assert header[-3:] == ["max grad norm", "spikes", "last-layer update ratio"]
    by_lr = {r[0]: r for r in rows}
    for lr, per_seed in figures.items():
        cols = list(zip(*per_seed))
        want = [f"{np.mean(c):.4g} ± {np.std(c, ddof=1):.2g}" for c in cols]
        assert by_lr[lr][-3:] == want


@pytest.mark.ddp
def test_ddp_health_figures_and_skips_match_one_process(corpus: Path, tmp_path: Path) -> None:
    """2 gloo ranks x batch 4 == 1 process x batch 8: the gradients are all-reduced, so rank 0's
    per-layer figures are the global ones, and a dropped step is dropped on every rank."""
    common = [*_overrides(corpus, "health.every_n_steps=5", "health.skip_steps=[7]"), "logger=none"]
    m1, m2 = train_one_and_two_processes(common, tmp_path)
    h1, h2 = m1["health"], m2["health"]
    assert h1["skipped_steps"] == h2["skipped_steps"] == [7]
    assert h2["batches"]["world_size"] == 2 and h1["batches"]["world_size"] == 1
    assert h1["last"]["step"] == h2["last"]["step"] == 10
    for key, v1 in h1["last"].items():
        if key.startswith(("health/grad_rms", "health/param_rms")):
            assert math.isclose(v1, h2["last"][key], rel_tol=2e-3), key
        elif key.startswith("health/update_ratio"):
            assert math.isclose(v1, h2["last"][key], rel_tol=2e-2), key
    assert math.isclose(h1["max_grad_norm"], h2["max_grad_norm"], rel_tol=2e-3)
    assert _inspect(f"run={tmp_path / 'two'}", "step=3").stdout.count("## rank 1,") == 4


@pytest.mark.slow
def test_health_with_compile(corpus: Path, tmp_path: Path) -> None:
    """The eager measurement forward leaves the compiled training graph alone."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: count only this run's graphs
    train_in_process(_overrides(corpus, "health.every_n_steps=5", "compile=true"), tmp_path / "r")
    h = read_metrics(tmp_path / "r")["health"]
    assert h["last"]["step"] == 10 and h["last"]["health/attn_entropy/block_0"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
