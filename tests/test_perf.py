"""Pins for tinyllm/perf.py: each speed measure relies on a Lightning (or glibc) internal, and
each test here fails when an upgrade moves that internal, instead of the measure silently
losing its speed or changing behaviour. (The measures' behaviour: tests/test_train_runtime.py.)"""

from __future__ import annotations

import inspect

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.profilers import PassThroughProfiler, Profiler
from lightning.pytorch.trainer import call

from tinyllm import perf
from tinyllm.module import LitGPT

MICRO = {"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


def test_fast_setattr_pins_lightnings_hook_name_assignment() -> None:
    # the attribute Lightning assigns before each hook call, the hottest of the plain names
    src = inspect.getsource(call._call_lightning_module_hook)
    assert "pl_module._current_fx_name = hook_name" in src
    assert "_current_fx_name" in LitGPT._plain_attrs
    # what we skip is nn.Module's own __setattr__ (Lightning adds none of its own)
    assert L.LightningModule.__setattr__ is torch.nn.Module.__setattr__
    lit = LitGPT(MICRO)
    keys = set(lit.state_dict())
    for name in LitGPT._plain_attrs:  # none of them may ever be a parameter, buffer or module
        assert name not in lit._parameters and name not in lit._buffers
        assert name not in lit._modules
    lit._loss_sum = torch.tensor(1.0)
    assert set(lit.state_dict()) == keys


def test_fast_setattr_setting_restores_the_stock_path(monkeypatch) -> None:
    lit = LitGPT(MICRO)
    monkeypatch.setattr(perf.FastSetattr, "enabled", False)
    calls: list[str] = []
    stock = torch.nn.Module.__setattr__

    def spy(self, name, value):
        calls.append(name)
        stock(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", spy)
    lit.tokens_seen = 3
    assert calls == ["tokens_seen"] and lit.tokens_seen == 3
    monkeypatch.setattr(perf.FastSetattr, "enabled", True)
    lit.tokens_seen = 4
    assert calls == ["tokens_seen"] and lit.tokens_seen == 4


def test_step_progress_bar_pins_the_rich_bar_internals() -> None:
    # the private hook we override, with the signature we call it with
    hook = RichProgressBar._get_train_description
    assert list(inspect.signature(hook).parameters) == ["self", "current_epoch"]
    assert isinstance(RichProgressBar.total_train_batches, property)
    assert isinstance(RichProgressBar.validation_description, property)
    assert "_leave" in vars(RichProgressBar(leave=False))
    assert "refresh_rate" in inspect.signature(RichProgressBar.__init__).parameters
    assert perf.StepProgressBar.on_train_batch_end is not RichProgressBar.on_train_batch_end


def test_noop_profiler_pins_the_per_hook_profile_call() -> None:
    # the trainer wraps every hook call in `profiler.profile(name)`: that call is what we make free
    for hook_caller in (call._call_lightning_module_hook, call._call_callback_hooks):
        assert ".profiler.profile(" in inspect.getsource(hook_caller)
    assert list(inspect.signature(Profiler.profile).parameters) == ["self", "action_name"]
    assert issubclass(perf.NoOpProfiler, PassThroughProfiler)
    prof = perf.NoOpProfiler()
    assert prof.profile("a") is prof.profile("b")  # one shared null context, no generator


def test_allocator_pins_glibc_mallopt_numbers() -> None:
    # malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3 (a stable ABI, pinned all the same)
    assert (perf._M_TRIM_THRESHOLD, perf._M_MMAP_THRESHOLD) == (-1, -3)
    assert perf.apply_cpu_allocator("default", "cpu") == "default"
    assert perf.apply_cpu_allocator("tuned", "gpu") == "default"
