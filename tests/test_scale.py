"""Correct at scale (issue 16), proven on CPU: process groups that die as one, global ranks,
one run directory per job, a lock around prepare, exact GPU peaks, precision choices."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from train_utils import REPO, TINY, read_metrics, write_corpus

from tinyllm import hardware, launch


# ------------------------------------------------------------------- processes die together
def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def _wait_gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _sleeper(seconds: int = 120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_dead_worker_ends_every_other_worker():
    procs = [_sleeper(), _sleeper()]
    group = launch.WorkerGroup(procs, first_rank=1)
    messages: list[str] = []
    done = threading.Event()
    group.watch(lambda msg: (messages.append(msg), done.set()))
    try:
        procs[0].send_signal(signal.SIGKILL)
        assert done.wait(60), "the watcher never noticed the dead worker"
        assert messages == ["DDP worker rank 1 died (signal 9); stopping"]
        assert procs[1].poll() is not None, "the surviving worker was left running"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


_PARENT = textwrap.dedent(
    """
    import sys, time
    from tinyllm.launch import launch_workers
    group = launch_workers(2, "timeit", ["-n", "1", "-s", "import time", "time.sleep(120)"], ".")
    print(group.procs[0].pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_their_parent(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    )
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(worker), "the worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_exit_descriptions():
    assert launch.describe_exit(-9) == "died (signal 9)"
    assert launch.describe_exit(3) == "exited with code 3"


def _children(pid: int, marker: bytes = b"tinyllm.train") -> list[int]:
    """Child processes of `pid` whose command line holds `marker` (our DDP workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and marker in cmdline:
                out.append(int(d.name))
    return out


@pytest.mark.ddp
def test_killed_ddp_worker_stops_the_run_with_a_clear_message(tmp_path):
    """A 2-process CPU run whose worker is SIGKILLed ends (not a 30-minute gloo wait)."""
    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY, "data=text", f"data.path={corpus}", f"data_root={tmp_path / 'data'}",
            "trainer.max_steps=100000", "trainer.val_check_interval=100000", "logger=none",
            "trainer.devices=2", "batch_size=4", "sample.max_new_tokens=0",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    rank0 = subprocess.Popen(
        [sys.executable, "-m", "tinyllm.train", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        workers: list[int] = []
        while not workers and time.monotonic() < deadline and rank0.poll() is None:
            # the DDP worker runs the saved job config (prepare's encoding processes, forked
            # from rank 0, carry rank 0's command line and come and go)
            workers = _children(rank0.pid, marker=b"ddp_job")
            time.sleep(0.5)
        assert workers, "rank 0 never started its worker"
        time.sleep(3)  # (let it reach the process group; a kill at any point must end the run)
        os.kill(workers[0], signal.SIGKILL)
        _, err = rank0.communicate(timeout=60)  # without the fix: gloo's 30-minute timeout
    finally:
        if rank0.poll() is None:
            rank0.kill()
            rank0.communicate()
    assert rank0.returncode != 0
    assert "DDP worker rank 1 died (signal 9); stopping" in err, err[-2000:]
    m = read_metrics(tmp_path / "run")
    assert m["status"] == "failed" and "rank 1 died" in m["error"]


# ----------------------------------------------------------------------------- global ranks
@pytest.mark.parametrize(
    "env, rank",
    [
        ({}, 0),
        ({"LOCAL_RANK": "1"}, 1),
        ({"RANK": "3", "LOCAL_RANK": "0"}, 3),  # torchrun, second node's first process
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, 2),  # srun
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2),
        ({"RANK": "1", "SLURM_PROCID": "0"}, 1),  # our workers inside a SLURM allocation
    ],
)
def test_global_rank_whoever_launched(monkeypatch, env, rank):
    from tinyllm.train import _is_rank_zero

    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch.global_rank() == rank
    assert _is_rank_zero() == (rank == 0)


def test_launch_env_is_restored_after_the_job(monkeypatch):
    monkeypatch.setenv("RANK", "7")  # e.g. set by a cluster: must survive our own launch
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    group = launch.launch_workers(1, "timeit", [], ".")
    assert group.procs == [] and os.environ["RANK"] == "0" and os.environ["LOCAL_RANK"] == "0"
    launch.clear_launch_env()
    assert os.environ["RANK"] == "7" and "LOCAL_RANK" not in os.environ


# ---------------------------------------------------------------------- prepare takes turns
def test_folder_lock_blocks_a_second_holder(tmp_path):
    entered = threading.Event()

    def second() -> None:
        with launch.folder_lock(tmp_path / "d"):
            entered.set()

    with launch.folder_lock(tmp_path / "d"):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)  # (flock locks per open file: threads exclude each other)
    t.join(30)
    assert entered.is_set()


def test_concurrent_prepares_of_one_folder_take_turns(tmp_path):
    """Two prepares started at once: one builds the folder, the other waits and reuses it."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=10)
    out = tmp_path / "data" / "d"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tinyllm.prepare", "data=text", f"data.path={corpus}",
           "tokenizer.vocab_size=300", f"out_dir={out}", "num_workers=1",
           "hydra.run.dir=.", "hydra.output_subdir=null"]  # fmt: skip
    with launch.folder_lock(out):  # hold the folder so that both start waiting on it
        procs = [
            subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        time.sleep(1.0)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("reusing" in e for e in errs) == 1, errs
    from tinyllm.data.prepare import read_meta

    assert read_meta(out)["splits"]["train"]["tokens"] > 0


# ----------------------------------------------------------------------- one run directory
def test_run_stamp_is_the_clock_for_a_single_process(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert launch.shared_stamp("%Y") == time.strftime("%Y")


def test_run_stamp_under_srun_is_the_same_in_every_task(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_START_TIME", "1700000000")
    fmt = "%Y-%m-%d/%H-%M-%S.%f"
    first = launch.shared_stamp(fmt)
    time.sleep(0.01)  # (a clock-based stamp would differ by now)
    assert launch.shared_stamp(fmt) == first and first.endswith("-slurm-4242")
    monkeypatch.delenv("SLURM_JOB_START_TIME")
    assert launch.shared_stamp(fmt) == "slurm-4242"


_TORCHRUN_PROBE = textwrap.dedent(
    """
    import os, sys
    from omegaconf import OmegaConf
    from tinyllm.launch import register_resolvers
    register_resolvers()
    cfg = OmegaConf.create({"dir": "outputs/${run_stamp:%Y-%m-%d/%H-%M-%S.%f}"})
    with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
        f.write(cfg.dir)
    """
)


@pytest.mark.ddp
def test_run_stamp_is_agreed_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this python")
    script = tmp_path / "probe.py"
    script.write_text(_TORCHRUN_PROBE)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    stamps = {(tmp_path / r).read_text() for r in ("0", "1")}
    assert len(stamps) == 1, stamps


def test_train_config_names_its_run_dir_with_the_shared_stamp():
    from omegaconf import OmegaConf

    hydra = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "train.yaml").hydra)
    for d in (hydra["run"]["dir"], hydra["sweep"]["dir"]):
        assert "${now:" not in d and "${run_stamp:" in d


# ------------------------------------------------------------------- GPU peaks, precision
def test_peak_table_matches_names_exactly():
    assert hardware.peak_tflops("NVIDIA L40S") == 362.0  # not the L4's 121
    assert hardware.peak_tflops("NVIDIA L4") == 121.0
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert hardware.peak_tflops("NVIDIA A10G") is None  # unknown, not the A10's figure
    assert hardware.peak_tflops("Tesla V100-SXM2-16GB") is None


def test_unknown_gpu_gets_no_mfu_and_says_so(monkeypatch, capsys):
    from omegaconf import OmegaConf

    from tinyllm import train

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L40S")
    cfg = OmegaConf.create({"perf": {"peak_tflops": None}})
    assert train._peak_flops(cfg, "gpu") == 362e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Imaginary X1")
    assert train._peak_flops(cfg, "gpu") is None
    assert "MFU unknown" in capsys.readouterr().out
    cfg = OmegaConf.create({"perf": {"peak_tflops": 100}})
    assert train._peak_flops(cfg, "gpu") == 100e12


def test_auto_precision_does_not_count_emulated_bf16(monkeypatch):
    """A GPU without bf16 units (V100, T4) emulates it: auto must pick 16-mixed there."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation  # emulation only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert hardware.resolve_precision("auto", "gpu", 768) == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto", "gpu", 768) == "bf16-mixed"
    assert hardware.resolve_precision("32-true", "gpu", 768) == "32-true"


@pytest.mark.parametrize(
    "flags, width, expected",
    [
        ("fpu avx2 fma", 4096, "32-true"),  # bf16 emulated: never
        ("fpu avx2 xamx_bf16_v2", 4096, "32-true"),  # (a made-up flag: whole words only)
        ("fpu avx512f avx512_bf16", 256, "32-true"),  # dot products only: from 512
        ("fpu avx512f avx512_bf16", 512, "bf16-mixed"),
        ("fpu avx512_bf16 amx_bf16 amx_tile", 64, "32-true"),  # AMX tiles: from 128
        ("fpu avx512_bf16 amx_bf16 amx_tile", 128, "bf16-mixed"),
    ],
)
def test_auto_precision_on_cpu_follows_the_bf16_units(
    monkeypatch, tmp_path, flags, width, expected
):
    """The CPU rule: AMX from width 128, avx512_bf16 alone from 512, emulated bf16 never; a
    flag is matched as a whole word (no 'avx512_bf16' inside another flag's name)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    real_path = hardware.Path
    monkeypatch.setattr(
        hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p)
    )
    assert hardware.resolve_precision("auto", "cpu", width) == expected
    assert hardware.resolve_precision("32-true", "cpu", width) == "32-true"


def test_bf16_true_loses_small_updates_as_the_warning_says():
    """The figures quoted in the bf16-true warning, recomputed."""

    def after_100_steps(dtype: torch.dtype) -> float:
        p = torch.nn.Parameter(torch.ones(1, dtype=dtype))
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        return float(p.detach())

    assert after_100_steps(torch.bfloat16) == 1.0
    assert round(after_100_steps(torch.float32), 2) == 0.90
    assert "stays 1.0" in hardware.BF16_TRUE_WARNING and "0.90" in hardware.BF16_TRUE_WARNING


def test_bf16_true_is_warned_where_it_is_chosen(capsys):
    from tinyllm import train

    train._precision_notes("bf16-true", "cpu")
    assert "no fp32 master" in capsys.readouterr().err
    train._precision_notes("bf16-mixed", "cpu")
    assert capsys.readouterr().err == ""


def test_torch_floor_has_what_the_code_calls():
    """SDPA's enable_gqa (model/attention.py) arrived in torch 2.5, F.rms_norm in 2.4."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("torch>="))
    floor = tuple(int(x) for x in spec.split(">=")[1].split(",")[0].split(".")[:2])
    assert floor >= (2, 5), spec


@pytest.mark.slow
def test_gpu_smoke_script_dry_run_on_cpu(tmp_path):
    """The smoke script's CPU dry mode runs every section it can and prints one JSON object."""
    import json

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--dry",
         "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "s.json")],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert json.loads(r.stdout) == summary
    for name in ("env", "prepare", "fp32_dry", "compile", "bf16_true", "generate"):
        assert summary[name]["ok"] is True, (name, summary[name])
    assert summary["fsdp"]["skipped"] and summary["flash"]["skipped"]
    assert summary["bf16_true"]["val_loss_exact"] > 0 and "dynamo" in summary["compile"]


# ------------------------------------------------------------------- ranks agree each window
def _spawn(fn, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run fn(rank, world, port, out_dir) in `world` processes on a gloo group; their JSON."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, launch.free_port(), str(tmp_path)), nprocs=world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _init_gloo(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _window_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from tinyllm.parallel import agree_window

    _init_gloo(rank, world, port)
    t0 = time.monotonic()
    if rank == 0:
        time.sleep(0.3)  # rank 0's clock runs ahead of rank 1's by ~0.3 s
    loss_sum = torch.tensor({0: 1.0 + 2.0, 1: 3.0 + 6.0}[rank])  # two steps on each rank
    mean, elapsed = agree_window(loss_sum, 2, t0)
    nan_mean, _ = agree_window(torch.tensor(float("nan") if rank == 1 else 1.0), 1, t0)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"mean": mean, "elapsed": elapsed, "nan": str(nan_mean)})
    )
    dist.destroy_process_group()


@pytest.mark.ddp
def test_window_loss_and_clock_are_agreed_across_ranks(tmp_path):
    r0, r1 = _spawn(_window_worker, tmp_path)
    assert r0["mean"] == r1["mean"] == 3.0  # (1 + 2 + 3 + 6) / 4: every rank's steps
    assert r0["elapsed"] == r1["elapsed"] >= 0.3  # rank 0's clock, on both
    assert r0["nan"] == r1["nan"] == "nan"  # rank 1's NaN stops rank 0 too


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """torch FSDP on gloo (Lightning's FSDP refuses CPUs): what changes once weights shard."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tinyllm.model.gpt import Block
    from tinyllm.module import LitGPT

    _init_gloo(rank, world, port)
    torch.manual_seed(0)
    lit = LitGPT({"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16})
    full = (lit.model.num_params(), lit.model.flops_per_token())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    lit.model.activation_checkpointing = rank == 1  # one rank recomputes, the other stores
    root = FSDP(
        lit, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
        device_id=torch.device("cpu"),
    )  # fmt: skip
    loss = root(x).float().pow(2).mean()
    loss.backward()
    norm = float(root.clip_grad_norm_(1e9))  # the norm over every rank's shards
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "full": full, "sharded": [lit.model.num_params(), lit.model.flops_per_token()],
        "counted": [lit.n_params, lit.flops_per_token], "norm": norm,
        "units": sum(isinstance(m, FSDP) for m in root.modules()),
    }))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.ddp
def test_fsdp_counts_params_once_before_wrapping(tmp_path):
    r0, r1 = _spawn(_fsdp_worker, tmp_path)
    for r in (r0, r1):
        assert r["sharded"][0] < r["full"][0]  # what a count after wrapping would report...
        assert r["counted"] == r["full"]  # ...and what LitGPT counted before wrapping
        assert r["units"] == 3  # the root and one unit per Block (auto-wrap)
    # same inputs and weights, activations recomputed on rank 1 only: the same gradients
    assert math.isclose(r0["norm"], r1["norm"], rel_tol=1e-6)


def test_ddp_and_fsdp_strategies_as_built():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from tinyllm.model.gpt import Block
    from tinyllm.parallel import build_strategy

    ddp = build_strategy("auto", world=2)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["broadcast_buffers"] is False
    assert isinstance(build_strategy("ddp", world=2), DDPStrategy)
    fsdp = build_strategy("fsdp", world=2)
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert isinstance(fsdp, FSDPStrategy) and policy._module_classes == {Block}
    assert build_strategy("auto", world=1) == "auto"


def test_activation_checkpointing_gives_the_same_gradients():
    from tinyllm.model import GPT, ModelConfig

    cfg = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        m = GPT(ModelConfig.from_dict(cfg))
        m.activation_checkpointing = on
        m(x).float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_nan_skip_is_refused_with_several_ranks():
    from tinyllm.errors import TinyLLMError
    from tinyllm.parallel import refuse_skip_with_ranks

    refuse_skip_with_ranks("skip", 1)
    refuse_skip_with_ranks("stop", 4)
    with pytest.raises(TinyLLMError, match="nan_policy=skip with 2 processes"):
        refuse_skip_with_ranks("skip", 2)


def test_eager_runs_a_compiled_model_without_compiling_again():
    import torch._dynamo.utils as du

    from tinyllm.model import GPT, ModelConfig
    from tinyllm.parallel import eager

    torch._dynamo.reset()
    du.counters.clear()
    m = GPT(ModelConfig.from_dict({"vocab_size": 64, "block_size": 16, "n_layer": 1,
                                   "n_head": 2, "n_embd": 16, "pos": "rope"}))  # fmt: skip
    m.compile(backend="eager")  # dynamo's tracing (what counts graphs), no code generation
    x = torch.randint(0, 64, (2, 16))
    m(x).float().mean().backward()
    graphs = du.counters["stats"]["unique_graphs"]
    assert graphs == 1 and not du.counters["graph_break"]  # the training graph: one, unbroken
    with eager(m), torch.no_grad():
        cache = m.init_kv_cache(1, max_seq_len=16, device="cpu")
        for t in range(1, 5):  # a new length at every call: each would be a recompile
            m(x[:1, t - 1 : t], kv_cache=cache)
    assert du.counters["stats"]["unique_graphs"] == graphs and not du.counters["graph_break"]


# ------------------------------------------------------------------------ FSDP, compile, clock
MICRO = {"vocab_size": 280, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


def _tokenizer():
    from tinyllm.tokenizer import BPETokenizer

    return BPETokenizer.train("the quick brown fox jumps over the lazy dog " * 20, 280)


def _sampler_trainer(strategy_name: str):
    from types import SimpleNamespace

    strategy = type(strategy_name, (), {})()
    return SimpleNamespace(sanity_checking=False, strategy=strategy, loggers=[], global_step=1)


def test_text_sampler_is_skipped_under_fsdp_with_one_line(monkeypatch, capsys):
    import tinyllm.sampling as sampling
    from tinyllm.callbacks import TextSampler
    from tinyllm.module import LitGPT

    calls = []
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append(1) or "text")
    cb = TextSampler(_tokenizer(), max_new_tokens=4)
    lit = LitGPT(MICRO)
    for _ in range(2):
        cb.on_validation_end(_sampler_trainer("FSDPStrategy"), lit)
    assert calls == [] and capsys.readouterr().out.count("skipped under FSDP") == 1
    cb.on_validation_end(_sampler_trainer("DDPStrategy"), lit)
    assert calls == [1]


def test_text_sampler_decodes_a_compiled_model_eagerly():
    import torch._dynamo.utils as du

    from tinyllm.callbacks import TextSampler
    from tinyllm.module import LitGPT

    torch._dynamo.reset()
    du.counters.clear()
    lit = LitGPT(MICRO)
    lit.model.compile(backend="eager")
    x = torch.randint(0, 280, (2, 16))
    lit.model(x).float().mean().backward()  # the training graph
    graphs = du.counters["stats"]["unique_graphs"]
    TextSampler(_tokenizer(), max_new_tokens=6, top_k=5).on_validation_end(
        _sampler_trainer("SingleDeviceStrategy"), lit
    )
    assert du.counters["stats"]["unique_graphs"] == graphs  # no recompile per decoded length
    assert not du.counters["graph_break"]


def test_fsdp_16_mixed_clips_through_the_root_module(monkeypatch):
    """With a gradient scaler (16-mixed) under FSDP, Lightning's FSDP precision plugin refuses
    norm clipping; it has unscaled the gradients by then, so the root module clips."""
    from types import SimpleNamespace

    import tinyllm.module as module
    from tinyllm.module import LitGPT

    calls = []

    class Root:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)
            return torch.tensor(2.0)

    lit = LitGPT(MICRO)
    lit._trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=Root()), precision_plugin=SimpleNamespace(scaler=object()),
        gradient_clip_val=1.0, gradient_clip_algorithm=None,
        global_step=3, log_every_n_steps=5, is_global_zero=True, loggers=[],
    )  # fmt: skip
    monkeypatch.setattr(module, "_is_fsdp", lambda m: isinstance(m, Root))
    assert lit.grad_norm_from_clipping()
    lit.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert calls == [1.0]


def test_time_budget_schedule_follows_the_agreed_clock_not_the_local_one():
    from tinyllm.module import LitGPT

    lit = LitGPT(MICRO, optim={"max_steps": 100, "max_time_s": 60.0, "warmup_steps": 0})
    lit._t_train_start = time.monotonic() - 1000  # this rank's own clock: far past the budget
    lit._elapsed_s = 0.0  # rank 0's clock, agreed at the latest window: just started
    assert lit._lr_lambda(10) == pytest.approx(_lr(lit, 10))
    lit._elapsed_s = 30.0  # half the budget: the schedule is at least half-way
    assert lit._lr_lambda(10) == pytest.approx(_lr(lit, 50))


def _lr(lit, step: int) -> float:
    from tinyllm.module import lr_factor

    return lr_factor(step, lit.optim_cfg)


def test_z_loss_without_boolean_selection_equals_the_masked_mean():
    from tinyllm.module import IGNORE_INDEX, LitGPT

    lit = LitGPT({**MICRO, "z_loss": 1e-2})
    logits = torch.randn(2, 5, 280, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 280, (2, 5), generator=torch.Generator().manual_seed(1))
    y[0, :2] = IGNORE_INDEX
    flat, t = logits.reshape(10, 280), y.reshape(10)
    ce = torch.nn.functional.cross_entropy(flat, t, ignore_index=IGNORE_INDEX)
    expected = ce + 1e-2 * torch.logsumexp(flat[t != IGNORE_INDEX], -1).pow(2).mean()
    torch.testing.assert_close(lit.loss(logits, y), expected)


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts tensor operations that make the host wait for the device's result."""

    SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero",
             "masked_select", "unique"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.counts: dict[int, int] = {}
        self.step = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.on:
            index = args[1] if name == "__getitem__" and len(args) > 1 else None
            boolean = isinstance(index, torch.Tensor) and index.dtype == torch.bool
            if name in self.SYNCS or boolean:
                self.counts[self.step] = self.counts.get(self.step, 0) + 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_on_steps_between_logging_windows():
    import lightning as L
    from torch.utils.data import DataLoader

    from tinyllm.module import LitGPT

    counter = _SyncCounter()

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            counter.step = trainer.global_step
            counter.on = trainer.global_step >= 2  # (after the first steps' one-off set-up)

    g = torch.Generator().manual_seed(0)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 280, (12, 4, 17), generator=g)]
    lit = LitGPT({**MICRO, "z_loss": 1e-4}, optim={"warmup_steps": 2})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=5, logger=False, callbacks=[Probe()],
        limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, gradient_clip_val=1.0,
    )  # fmt: skip
    with counter:
        trainer.fit(lit, DataLoader(batches, batch_size=None))
    window_ends = {4, 9, 11}  # steps whose end reads the window (0-based: steps 5, 10, 12 done)
    quiet = {s: n for s, n in counter.counts.items() if s not in window_ends}
    assert quiet == {}, f"host syncs on steps between windows: {quiet}"
    assert all(counter.counts.get(s, 0) <= 3 for s in window_ends)  # loss mean, clip norm, lr


def test_exact_match_is_skipped_under_fsdp_with_one_line(monkeypatch, capsys):
    from types import SimpleNamespace

    import tinyllm.data.qa as qa

    calls = []
    monkeypatch.setattr(qa, "exact_match", lambda *a, **k: calls.append(1) or 1.0)
    cb = qa.ExactMatchCallback([object()], tokenizer=None)
    trainer = SimpleNamespace(sanity_checking=False, strategy=type("FSDPStrategy", (), {})(),
                              is_global_zero=True, global_rank=0, world_size=2)  # fmt: skip
    for _ in range(2):
        cb.on_validation_epoch_end(trainer, SimpleNamespace(model=None))
    assert calls == [] and capsys.readouterr().out.count("skipped under FSDP") == 1


def test_unclipped_grad_norm_under_fsdp_spans_every_rank():
    """Without clipping, train/grad_norm under FSDP comes from the root module (all shards),
    not from this rank's shards of the gradients."""
    from types import SimpleNamespace

    from tinyllm.callbacks import ThroughputMonitor

    calls, logged = [], []

    class Root:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)
            return torch.tensor(5.0)

    pl_module = SimpleNamespace(
        grad_norm_from_clipping=lambda: False,
        log_step_metrics=lambda m, step=None: logged.append(m),
        parameters=lambda: [],
    )
    trainer = SimpleNamespace(global_step=4, strategy=SimpleNamespace(model=Root()))
    opt = SimpleNamespace(param_groups=[{"lr": 0.1}])
    ThroughputMonitor(every=5).on_before_optimizer_step(trainer, pl_module, opt)
    assert calls == [float("inf")] and logged[0]["train/grad_norm"] == 5.0


# ------------------------------------------------------------------------ the entry point
@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    corpus = write_corpus(root / "corpus", n_docs=20)
    return [*TINY, "data=text", f"data.path={corpus}", f"data_root={root / 'data'}",
            "logger=none", "sample.max_new_tokens=0"]  # fmt: skip


def test_activation_checkpointing_option_trains_the_same(tiny_args, tmp_path):
    from train_utils import train_in_process

    args = [*tiny_args, "trainer.max_steps=4", "trainer.val_check_interval=4"]
    plain = train_in_process(args, tmp_path / "plain")
    recomputed = train_in_process([*args, "trainer.activation_checkpointing=true"], tmp_path / "ac")
    assert recomputed["status"] == "completed"
    assert math.isclose(plain["val/loss"], recomputed["val/loss"], rel_tol=1e-5)


def test_nan_skip_with_two_processes_fails_before_any_worker_starts(tiny_args, tmp_path):
    from train_utils import train_in_process

    from tinyllm.errors import TinyLLMError

    with pytest.raises(TinyLLMError, match="nan_policy=skip with 2 processes"):
        train_in_process([*tiny_args, "nan_policy=skip", "trainer.devices=2"], tmp_path / "r")
    assert not (tmp_path / "r" / ".tinyllm").exists()  # no worker was started


def test_tf32_only_on_cuda(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        assert hardware.enable_tf32("cpu") is False
        assert torch.get_float32_matmul_precision() == before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert hardware.enable_tf32("gpu") is True
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
