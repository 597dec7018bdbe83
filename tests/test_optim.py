"""Optimizers as a config group: the registry, the parameter split, Muon beside AdamW."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from tinyllm.errors import TinyLLMError
from tinyllm.model import ACTIVATIONS, GPT, NORMS, POSITIONS, ModelConfig
from tinyllm.module import LitGPT, lr_factor
from tinyllm.optim import (
    OPTIMIZERS,
    Combined,
    OptimConfig,
    build_optimizer,
    check_strategy,
    param_roles,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without Muon")


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------ registry and conf files
def test_registry_keys_match_conf_files() -> None:
    files = {p.stem for p in (REPO / "conf" / "optim").glob("*.yaml")}
    assert files == set(OPTIMIZERS)
    fields = set(OptimConfig.__dataclass_fields__)
    for name in OPTIMIZERS:
        path = REPO / "conf" / "optim" / f"{name}.yaml"
        assert path.read_text().startswith("# @package optim")
        values = yaml.safe_load(path.read_text())
        assert values["name"] == name
        assert set(values) <= fields


def test_the_default_is_adamw_as_it_was() -> None:
    """optim=adamw gives exactly the old groups: matrices decay; embeddings, norms and
    biases don't; the fused kernel on CPU."""
    torch.manual_seed(0)
    lit = LitGPT(SMALL)
    opt = lit.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    old = lit.model.param_groups(0.1)  # the model's own (pre-registry) grouping
    assert len(opt.param_groups) == 2
    for new_g, old_g in zip(opt.param_groups, old, strict=True):
        assert [id(p) for p in new_g["params"]] == [id(p) for p in old_g["params"]]
        assert new_g["weight_decay"] == old_g["weight_decay"]
    g = opt.param_groups[0]
    assert (g["initial_lr"], g["betas"], g["eps"]) == (1e-3, (0.9, 0.95), 1e-8)


@needs_muon
@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie: bool) -> None:
    lit = LitGPT({**SMALL, "tie_weights": tie},
                 optim={"name": "muon", "lr": 2e-3, "adam_lr": 5e-3, "momentum": 0.9})  # fmt: skip
    opt = lit.configure_optimizers()["optimizer"]
    assert isinstance(opt, Combined)
    muon, adamw = opt.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    m = lit.model
    in_muon = _names(m, [p for g in muon.param_groups for p in g["params"]])
    assert in_muon == {n for n, p in m.named_parameters()
                       if n.startswith("transformer.h.") and p.dim() == 2}  # fmt: skip
    assert all(".attn." in n or ".mlp." in n for n in in_muon)
    in_adam = _names(m, [p for g in adamw.param_groups for p in g["params"]])
    assert in_adam == {n for n, _ in m.named_parameters()} - in_muon  # every other parameter
    assert "transformer.wte.weight" in in_adam and ("lm_head.weight" in in_adam) != tie
    # (the LR scheduler keeps each group's base LR as initial_lr)
    assert [g["initial_lr"] for g in muon.param_groups] == [2e-3]
    assert muon.param_groups[0]["momentum"] == 0.9
    assert [g["initial_lr"] for g in adamw.param_groups] == [5e-3, 5e-3]
    decayed = _names(m, adamw.param_groups[0]["params"])
    assert decayed == (set() if tie else {"lm_head.weight"})  # an untied head decays
    assert opt.param_groups == muon.param_groups + adamw.param_groups  # the same dicts


@needs_muon
def test_muon_builds_for_every_part_and_size() -> None:
    for norm in NORMS:
        for act in ACTIVATIONS:
            for pos in POSITIONS:
                cfg = {**SMALL, "norm": norm, "activation": act, "pos": pos}
                lit = LitGPT(cfg, optim={"name": "muon"})
                opt = lit.configure_optimizers()["optimizer"]
                x = torch.randint(0, 64, (2, 16))
                lit.loss(lit(x), x).backward()
                opt.step()  # one real step with every part
                covered = sum(len(g["params"]) for g in opt.param_groups)
                assert covered == len(list(lit.model.parameters()))
    for size in (REPO / "conf" / "model").glob("*.yaml"):
        values = yaml.safe_load(size.read_text())
        with torch.device("meta"):  # no memory for the large presets
            model = GPT(ModelConfig.from_dict({**values, "vocab_size": 512}))
        roles = param_roles(model)
        opt = build_optimizer(model.named_parameters(), roles, OptimConfig(name="muon"))
        assert len(opt.optimizers[0].param_groups[0]["params"]) >= 4 * values["n_layer"]


@needs_muon
def test_one_schedule_drives_both_optimizers() -> None:
    lit = LitGPT(SMALL, optim={"name": "muon", "lr": 1e-2, "adam_lr": 3e-3,
                               "warmup_steps": 2, "max_steps": 10})  # fmt: skip
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    x = torch.randint(0, 64, (2, 16))
    for step in range(8):
        factor = lr_factor(step, lit.optim_cfg)
        muon, adamw = opt.optimizers
        assert math.isclose(muon.param_groups[0]["lr"], 1e-2 * factor, rel_tol=1e-9)
        assert all(math.isclose(g["lr"], 3e-3 * factor, rel_tol=1e-9) for g in adamw.param_groups)
        lit.loss(lit(x), x).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


# ---------------------------------------------------------------- groups planned before FSDP
class _FlatShards(nn.Module):
    """What FSDP (use_orig_params) shows an optimizer: the original names behind wrapper
    prefixes, every parameter a flat 1-D shard."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self._fsdp_wrapped_module = model
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, nn.Parameter(p.detach().flatten()))


def test_groups_are_planned_on_the_plain_model_not_the_flat_shards() -> None:
    """Under FSDP the shards are 1-D, so a shape test put every matrix in the no-decay
    group (issue 16): the roles come from the plain model's names and shapes instead."""
    torch.manual_seed(0)
    lit = LitGPT({**SMALL, "tie_weights": False})
    plain = {n for n, p in lit.model.named_parameters() if p.dim() == 2 and "wte" not in n
             and "wpe" not in n}  # fmt: skip
    lit.model = _FlatShards(lit.model)  # type: ignore[assignment]
    assert all(p.dim() == 1 for p in lit.model.parameters())
    # the old grouping, by shape on the parameters the optimizer receives, decays nothing
    assert not [p for p in lit.model.parameters() if p.dim() >= 2]
    opt = lit.configure_optimizers()["optimizer"]
    inner = lit.model._fsdp_wrapped_module
    decayed = _names(inner, opt.param_groups[0]["params"])
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert decayed == plain and len(decayed) == 4 * SMALL["n_layer"] + 1  # + the untied head


def test_a_parameter_the_plan_does_not_know_is_an_error() -> None:
    lit = LitGPT(SMALL)
    lit.model.extra = nn.Linear(2, 2)
    with pytest.raises(TinyLLMError, match="extra.weight"):
        lit.configure_optimizers()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "values, match",
    [
        ({"name": "sgd9"}, "adamw, muon"),
        ({"lr": 0.0}, "optim.lr"),
        ({"name": "muon", "lr": -1e-3}, "optim.lr"),
        ({"name": "muon", "adam_lr": 0.0}, "adam_lr"),
        ({"name": "muon", "momentum": 1.0}, r"momentum=1.0 must lie in \[0, 1\)"),
        ({"name": "muon", "momentum": -0.1}, "momentum"),
        ({"name": "muon", "ns_steps": 0}, "ns_steps=0"),
        ({"name": "muon", "adjust_lr_fn": "keller"}, "adjust_lr_fn"),
        ({"beta2": 1.0}, "beta2"),
    ],
)
def test_bad_values_are_named(values: dict, match: str) -> None:
    with pytest.raises(TinyLLMError, match=match):
        OptimConfig.from_dict(values)


def test_muon_under_fsdp_is_refused_with_the_alternative() -> None:
    with pytest.raises(TinyLLMError, match="trainer.strategy=ddp"):
        check_strategy(OptimConfig(name="muon"), "FSDPStrategy")
    check_strategy(OptimConfig(name="adamw"), "FSDPStrategy")  # AdamW is fine on shards
    check_strategy(OptimConfig(name="muon"), "DDPStrategy")
    lit = LitGPT(SMALL, optim={"name": "muon"})
    lit._trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    with pytest.raises(TinyLLMError, match="whole matrices"):
        lit.configure_optimizers()


def test_a_torch_without_muon_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(TinyLLMError, match="optim=adamw"):
        OptimConfig.from_dict({"name": "muon"})
    OptimConfig.from_dict({"name": "adamw"})


def test_unknown_optim_group_lists_the_valid_names(tmp_path) -> None:
    from train_utils import train_cli

    r = train_cli(["optim=unknown", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert r.returncode != 0
    assert "adamw" in r.stderr and "muon" in r.stderr, r.stderr[-2000:]


def test_resuming_with_another_optimizer_is_refused() -> None:
    muon = LitGPT(SMALL, optim={"name": "muon"}).configure_optimizers()["optimizer"]
    with pytest.raises(TinyLLMError, match="same `optim=`"):
        muon.load_state_dict(torch.optim.AdamW(nn.Linear(2, 2).parameters()).state_dict())


# ----------------------------------------------------------------------- real training runs
def _base(corpus, data_root) -> list[str]:
    from train_utils import text_run

    return text_run(corpus, data_root)


MUON = ["optim=muon", "optim.lr=3e-3", "optim.momentum=0.9", "optim.adam_lr=2e-3"]


@pytest.fixture(scope="module")
def muon_run(corpus, data_root, tmp_path_factory):
    from train_utils import train_in_process

    run_dir = tmp_path_factory.mktemp("muon")
    final = train_in_process(
        [*_base(corpus, data_root), *MUON, "checkpoint.every_n_steps=15"], run_dir
    )
    return run_dir, final


def _hparams(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    raw = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in
            info.hparams.items()}  # fmt: skip


@needs_muon
def test_a_muon_run_names_its_optimizer_and_settings(muon_run):
    from train_utils import read_metrics

    run_dir, final = muon_run
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["step"] == 30 and math.isfinite(m["val/bpb"])
    assert m["history"][-1]["val/loss"] < m["history"][0]["val/loss"] < math.log(320)
    o = m["config"]["optim"]
    assert (o["name"], o["lr"], o["momentum"], o["adam_lr"]) == ("muon", 3e-3, 0.9, 2e-3)
    assert o["ns_steps"] == 5 and o["adjust_lr_fn"] == "match_rms_adamw"
    hp = _hparams(run_dir)
    assert hp["optim/name"] == "muon" and hp["optim/momentum"] == 0.9
    assert hp["optim/adjust_lr_fn"] == "match_rms_adamw"


@needs_muon
def test_checkpoints_hold_both_optimizers_states(muon_run):
    run_dir, _ = muon_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    muon_sd, adamw_sd = ckpt["optimizer_states"][0]["combined"]
    assert muon_sd["state"] and all("momentum_buffer" in s for s in muon_sd["state"].values())
    assert adamw_sd["state"] and all("exp_avg_sq" in s for s in adamw_sd["state"].values())
    n_hidden = 4 * 2  # nano: 2 layers x (qkv, attn proj, fc, mlp proj)
    assert len(muon_sd["state"]) == n_hidden
    assert ckpt["tinyllm"]["optim"]["name"] == "muon"


@needs_muon
def test_muon_resume_equals_uninterrupted(muon_run, corpus, data_root, tmp_path):
    from train_utils import read_metrics, train_in_process

    run_dir, _ = muon_run
    full = read_metrics(run_dir)
    resumed_dir = tmp_path / "resumed"
    ckpt = run_dir / "checkpoints" / "step-15.ckpt"
    train_in_process([*_base(corpus, data_root), *MUON, f"ckpt_path={ckpt}"], resumed_dir)
    resumed = read_metrics(resumed_dir)
    assert resumed["step"] == 30 and resumed["tokens"] == full["tokens"]
    assert math.isclose(resumed["val/loss"], full["val/loss"], rel_tol=1e-5, abs_tol=1e-5)
    a = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@needs_muon
def test_muon_with_accumulation_clipping_and_bf16_mixed(corpus, data_root, tmp_path):
    from train_utils import train_in_process

    final = train_in_process(
        [*_base(corpus, data_root), *MUON, "trainer.max_steps=8", "trainer.val_check_interval=8",
         "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5",
         "trainer.precision=bf16-mixed", "logger=none", "sample.max_new_tokens=0"],
        tmp_path / "r",
    )  # fmt: skip
    assert final["step"] == 8 and math.isfinite(final["val/loss"])
    assert final["val/loss"] < math.log(320)


@needs_muon
@pytest.mark.slow
def test_muon_with_compile(corpus, data_root, tmp_path):
    from train_utils import train_in_process

    final = train_in_process(
        [*_base(corpus, data_root), *MUON, "compile=true", "trainer.max_steps=6",
         "trainer.val_check_interval=6", "logger=none", "sample.max_new_tokens=0"],
        tmp_path / "c",
    )  # fmt: skip
    assert final["step"] == 6 and math.isfinite(final["val/loss"])


@needs_muon
@pytest.mark.ddp
def test_muon_ddp_two_processes_match_one(corpus, data_root, tmp_path):
    """2 CPU processes x batch 4 (gloo) == 1 process x batch 8 with Muon: every rank holds
    the full averaged gradient, so every rank makes the same orthogonalised update."""
    from train_utils import train_one_and_two_processes

    common = [*_base(corpus, data_root), *MUON, "trainer.max_steps=20", "logger=none",
              "trainer.val_check_interval=10", "sample.max_new_tokens=0"]  # fmt: skip
    m1, m2 = train_one_and_two_processes(common, tmp_path)
    assert m2["devices"] == 2 and m1["tokens"] == m2["tokens"]
    assert m1["config"]["optim"]["name"] == m2["config"]["optim"]["name"] == "muon"
    for h1, h2 in zip(m1["history"], m2["history"], strict=True):
        assert h1["step"] == h2["step"]
        assert math.isclose(h1["val/loss"], h2["val/loss"], rel_tol=2e-3), (h1, h2)


@needs_muon
def test_loading_a_state_keeps_the_schedule_driving_every_child() -> None:
    """A child's load_state_dict swaps in new group dicts: the combined optimizer relinks,
    else the LR scheduler would write to groups no optimizer reads (a resumed run then kept
    the LR of the checkpoint's step)."""
    lit = LitGPT(SMALL, optim={"name": "muon"})
    opt = lit.configure_optimizers()["optimizer"]
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups == [g for o in opt.optimizers for g in o.param_groups]
    assert all(a is b for a, b in zip(opt.param_groups, opt.optimizers[0].param_groups))
    opt.param_groups[0]["lr"] = 0.123
    assert opt.optimizers[0].param_groups[0]["lr"] == 0.123


@needs_muon
def test_the_combined_state_keeps_each_parameter_in_its_own_optimizer() -> None:
    lit = LitGPT(SMALL, optim={"name": "muon"})
    opt = lit.configure_optimizers()["optimizer"]
    x = torch.randint(0, 64, (2, 16))
    lit.loss(lit(x), x).backward()
    opt.step()
    for p in lit.model.parameters():  # reads (as Lightning's state-to-device move does)
        opt.state[p] = dict(opt.state[p])
    muon, adamw = opt.optimizers
    assert len(opt.state) == len(list(lit.model.parameters()))
    assert len(muon.state) == len(muon.param_groups[0]["params"])
    opt.state_dict()  # every state entry belongs to a parameter of its own optimizer


# ------------------------------------------------------------------- the study's figures
def test_time_to_reach_interpolates_the_crossing() -> None:
    from tinyllm.analysis.stats import time_to_reach

    times, values = [10.0, 20.0, 30.0, 40.0], [3.0, 2.6, 2.2, 2.0]
    assert time_to_reach(times, values, 2.4) == pytest.approx(25.0)  # between 2.6 and 2.2
    assert time_to_reach(times, values, 3.5) == 10.0  # already there at the first validation
    assert time_to_reach(times, values, 2.2) == pytest.approx(30.0)
    assert time_to_reach(times, values, 1.9) is None  # never reached
    assert time_to_reach([1.0, 2.0], [float("nan"), 1.0], 1.5) == 2.0


def test_report_pools_seeds_and_compares_by_optim(tmp_path) -> None:
    from test_report import metrics_for, write_job, write_multirun

    from tinyllm.analysis import load_sweep, summarize
    from tinyllm.analysis.stats import welch_p_value

    finals = {"adamw": [2.50, 2.52, 2.49], "muon": [2.40, 2.43, 2.41]}
    root = tmp_path / "mr"
    write_multirun(root, ["seed=0,1,2", "optim=adamw,muon"])
    num = 0
    for seed in range(3):  # seed-major, as experiments/optimizers.yaml runs
        for optim in ("adamw", "muon"):
            write_job(root, num, [f"seed={seed}", f"optim={optim}"],
                      metrics_for(finals[optim][seed]))  # fmt: skip
            num += 1
    rows = summarize(load_sweep(root), "val/bpb", baseline="optim=adamw")
    assert [r.label for r in rows] == ["optim=adamw", "optim=muon"]
    assert rows[1].mean == pytest.approx(sum(finals["muon"]) / 3)
    assert rows[1].p_value == pytest.approx(welch_p_value(finals["muon"], finals["adamw"]))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tinyllm.train  # noqa: F401  registers the ${finetuning:...} resolver the YAML uses

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_study_gives_each_optimizer_its_own_lr_grid() -> None:
    grid = yaml.safe_load((REPO / "experiments" / "optimizers.yaml").read_text())["lr_grid"]
    for name in ("adamw", "muon"):
        for level in ("lo", "mid", "hi"):
            cfg = _compose(["experiment=optimizers", f"optim={name}", f"lr_level={level}"])
            assert cfg["optim"]["name"] == name
            assert cfg["optim"]["lr"] == grid[name][level]
            OptimConfig.from_dict({**cfg["optim"], "max_steps": 10})
    cfg = _compose([])  # and without an experiment: AdamW as before the registry
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["lr"] == 1e-3


def test_the_shakespeare_record_uses_muon_and_rope() -> None:
    cfg = _compose(["experiment=shakespeare_cpu"])
    assert cfg["optim"]["name"] == "muon" and cfg["model"]["pos"] == "rope"
    assert cfg["budget"]["max_time_s"] == 50  # the quick default stays short
    # the measured record settings (benchmarks/README.md) reach the model and the loader
    assert cfg["model"]["tie_weights"] is False and cfg["model"]["zero_init_proj"] is True
    assert cfg["batch_size"] == 16 and cfg["model"]["block_size"] == 128
    assert cfg["optim"]["lr"] == 1.2e-2 and cfg["optim"]["min_lr"] == 1.2e-4
    assert cfg["optim"]["weight_decay"] == 1.0 and cfg["trainer"]["precision"] == "auto"
