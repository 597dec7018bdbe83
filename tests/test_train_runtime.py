"""The per-step fast path of training: allocator tuning, windowed train/loss, light progress bar."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader, Dataset

from tinyllm import perf as runtime
from tinyllm.module import DivergenceError, LitGPT
from tinyllm.perf import NoOpProfiler, StepProgressBar

MICRO = {"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


# ------------------------------------------------------------------------------- allocator
_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    fields = ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost")
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields.split()]
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Info
    if sys.argv[1] == "tuned":
        from tinyllm.perf import tune_cpu_allocator
        assert tune_cpu_allocator()
    before = mallinfo2()
    buf = torch.empty(8 << 20, dtype=torch.uint8)  # an 8 MiB activation-sized buffer
    mmapped = mallinfo2().hblkhd - before.hblkhd
    del buf
    kept = mallinfo2().arena - before.arena  # heap still held after the free
    print(json.dumps({"mmapped": mmapped, "kept": kept}))
    """
)


def _probe(mode: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    try:
        import ctypes

        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(
    runtime._skip_reason() is not None or not _has_mallinfo2(), reason="needs glibc >= 2.33"
)
def test_tuned_allocator_keeps_step_buffers_in_the_heap():
    # The mechanism behind the speed-up. By default glibc serves an 8 MiB block with fresh
    # mmap pages (unmapped again on free, faulted in and zeroed again on the next step);
    # tuned, it comes from the heap and stays there after free for the next step to reuse.
    default, tuned = _probe("default"), _probe("tuned")
    assert default["mmapped"] >= 8 << 20, default
    assert tuned["mmapped"] == 0, tuned
    assert tuned["kept"] >= 8 << 20, tuned  # not trimmed back to the kernel


def test_allocator_respects_a_users_choice(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(var, raising=False)
    assert runtime._skip_reason() is None
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert "MALLOC_TRIM_THRESHOLD_" in runtime._skip_reason()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "jemalloc" in runtime._skip_reason()
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert "not glibc" in runtime._skip_reason()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "not Linux" in runtime._skip_reason()


# ------------------------------------------------------------------------- train/loss window
class _Batches(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(
            0, MICRO["vocab_size"], (n, 4, MICRO["block_size"] + 1), generator=g
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i, :, :-1], self.rows[i, :, 1:]


class _Recorder(Logger):
    """Keeps what Lightning writes to loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class _StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(lit: LitGPT, steps: int, every: int, accumulate: int = 1, callbacks_extra=(), **kw):
    rec, seen = _Recorder(), _StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=every, logger=rec,
        callbacks=[seen, *callbacks_extra], accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, **kw,
    )  # fmt: skip
    loader = DataLoader(_Batches(steps * accumulate), batch_size=None)
    trainer.fit(lit, train_dataloaders=loader)
    return trainer, rec, seen.losses


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_loss_is_the_mean_over_each_logging_window(accumulate):
    torch.manual_seed(0)
    lit = LitGPT(MICRO)
    trainer, rec, losses = _fit(lit, steps=12, every=5, accumulate=accumulate)
    logged = {step: m["train/loss"] for step, m in rec.rows if "train/loss" in m}
    # Written after steps 5 and 10 and the last one (Lightning's index for training logs is
    # steps done - 1), each the mean over its window of steps.
    assert sorted(logged) == [4, 9, 11]
    # (Lightning hands on_train_batch_end the loss divided by the accumulation factor)
    per_step = [sum(losses[i : i + accumulate]) for i in range(0, len(losses), accumulate)]
    assert math.isclose(logged[4], sum(per_step[0:5]) / 5, rel_tol=1e-5)
    assert math.isclose(logged[9], sum(per_step[5:10]) / 5, rel_tol=1e-5)
    assert math.isclose(logged[11], sum(per_step[10:12]) / 2, rel_tol=1e-5)
    assert lit.step_metrics["train/loss"] == logged[11]  # what metrics.json and the bar show


def test_step_metrics_share_the_logged_step():
    from tinyllm.callbacks import ThroughputMonitor

    torch.manual_seed(0)
    lit = LitGPT(MICRO, optim={"warmup_steps": 2, "max_steps": 10})
    _, rec, _ = _fit(lit, steps=10, every=5, callbacks_extra=[ThroughputMonitor(every=5)])
    by_key: dict[str, list[int]] = {}
    for step, m in rec.rows:
        for k in m:
            by_key.setdefault(k, []).append(step)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert by_key[key] == [4, 9], (key, by_key)
    assert lit.step_metrics["train/tokens"] == 10 * 4 * MICRO["block_size"]


class _GradNorms(L.Callback):
    """Global gradient norm before clipping (on_before_optimizer_step runs before it) and
    after (the step's gradients are still there at on_train_batch_end)."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.after: dict[int, float] = {}

    @staticmethod
    def _norm(module) -> float:
        return float(torch.stack([p.grad.norm() for p in module.parameters()]).norm())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before[trainer.global_step] = self._norm(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._norm(pl_module)


def test_norm_clipping_logs_the_norm_it_measured():
    from tinyllm.callbacks import ThroughputMonitor

    torch.manual_seed(0)
    lit = LitGPT(MICRO, optim={"lr": 1e-2, "warmup_steps": 0})
    norms = _GradNorms()
    _, rec, _ = _fit(lit, steps=10, every=5, gradient_clip_val=0.5,
                     callbacks_extra=[norms, ThroughputMonitor(every=5)])  # fmt: skip
    logged = [(step, m["train/grad_norm"]) for step, m in rec.rows if "train/grad_norm" in m]
    assert [step for step, _ in logged] == [4, 9]  # once per logging step, not twice
    for step, value in logged:
        assert math.isclose(value, norms.before[step], rel_tol=1e-5)  # the norm before clipping
    clipped = [s for s, n in norms.before.items() if n > 0.5]
    assert clipped  # (lr 1e-2 on random tokens: the gradients exceed 0.5)
    for s in clipped:
        assert norms.after[s] <= 0.5 * (1 + 1e-4)  # ...and the clipping happened


def test_fp16_mixed_trains_with_clipping_and_fused_adamw_only_without_a_scaler():
    # Lightning refuses to clip when a fused optimizer unscales inside its step. On a CPU,
    # Lightning runs 16-mixed as bf16-mixed, without a gradient scaler: tinyllm clips itself
    # and keeps the fused kernel (this used to stop with Lightning's error)...
    torch.manual_seed(0)
    lit = LitGPT(MICRO)
    trainer, _, losses = _fit(lit, steps=2, every=1, precision="16-mixed", gradient_clip_val=1.0)
    assert trainer.global_step == 2 and all(math.isfinite(x) for x in losses)
    # ...while with a scaler (16-mixed on GPUs) the optimizer is the foreach one, so
    # Lightning unscales before clipping.
    lit._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    opt = lit.configure_optimizers()["optimizer"]
    assert opt.defaults["foreach"] and not opt.defaults.get("fused")


def test_fsdp_clipping_goes_through_the_root_module(monkeypatch):
    # FSDP itself cannot run on CPUs; this checks the branch: the wrapped root module's
    # clip_grad_norm_ (the norm over every rank's shards) is called and its norm logged.
    import tinyllm.module as module

    calls = []

    class Root:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)
            return torch.tensor(3.0)

    rec = _Recorder()
    lit = LitGPT(MICRO)
    lit._trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=Root()), precision_plugin=SimpleNamespace(),
        gradient_clip_val=1.0, gradient_clip_algorithm=None,
        global_step=4, log_every_n_steps=5, is_global_zero=True, loggers=[rec],
    )  # fmt: skip
    monkeypatch.setattr(module, "_is_fsdp", lambda m: isinstance(m, Root))
    assert lit.grad_norm_from_clipping()
    lit.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert calls == [1.0] and rec.rows == [(4, {"train/grad_norm": 3.0})]
    # An FSDP strategy whose root is not FSDP-wrapped is left to Lightning (which refuses
    # norm clipping there with its own message) rather than clipped shard by shard.
    FSDPStrategy = type("FSDPStrategy", (), {"model": object()})
    lit._trainer.strategy = FSDPStrategy()
    assert not lit.grad_norm_from_clipping()


def test_non_finite_loss_stops_within_one_window_and_blocks_checkpoints():
    torch.manual_seed(0)
    lit = LitGPT({**MICRO, "extra": {}}, optim={"lr": 1e12, "warmup_steps": 0})
    with pytest.raises(DivergenceError, match=r"non-finite training loss .* in steps 1\.\.5"):
        _fit(lit, steps=12, every=5, gradient_clip_val=None)
    lit = LitGPT(MICRO)
    lit._loss_sum, lit._loss_count = torch.tensor(float("nan")), 1
    with pytest.raises(DivergenceError, match="non-finite"):
        lit.on_save_checkpoint({"state_dict": {}})


# ------------------------------------------------------------------------------ progress bar
def test_progress_bar_does_its_work_every_refresh_rate_steps(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(
        RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: calls.append(i)
    )
    monkeypatch.setattr(RichProgressBar, "on_train_epoch_start", lambda self, t, m: None)
    bar = StepProgressBar(refresh_rate=10)
    # an epoch of 100 batches, of which 25 are left before max_steps
    bar._trainer = SimpleNamespace(
        num_training_batches=100, max_epochs=-1, max_steps=75, global_step=50
    )
    bar.on_train_epoch_start(bar._trainer, None)
    for i in range(25):
        bar.on_train_batch_end(None, None, None, None, i)
    assert calls == [9, 19, 24]  # every 10th batch, and the last one


def test_progress_bar_epoch_text_and_no_restart_between_epochs():
    bar = StepProgressBar()
    assert bar._leave is False  # (leave=True stops and restarts the live display per epoch)
    bar._trainer = SimpleNamespace(max_epochs=-1)  # step-based: epochs are unbounded
    assert bar._get_train_description(3).strip() == "Epoch 3"
    bar._trainer = SimpleNamespace(max_epochs=5)
    assert bar._get_train_description(3).strip() == "Epoch 3/4"


def test_fast_setattr_keeps_module_registration():
    lit = LitGPT(MICRO)
    keys = set(lit.state_dict())
    lit._current_fx_name = "training_step"
    lit.tokens_seen = 7
    lit._loss_sum = torch.tensor(1.0)
    assert set(lit.state_dict()) == keys  # no tensor became a buffer
    assert lit.tokens_seen == 7 and lit._current_fx_name == "training_step"
    lit.extra_head = torch.nn.Linear(2, 2)  # other attributes still register normally
    assert "extra_head.weight" in lit.state_dict()


def test_noop_profiler_contexts_nest_and_repeat():
    prof = NoOpProfiler()
    with prof.profile("a"), prof.profile("b"), prof.profile("a"):
        pass
    assert prof.summary() == ""
