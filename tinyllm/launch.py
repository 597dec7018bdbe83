"""Starting the DDP worker processes ourselves (rank 0 is the process the user started).

Lightning's own launcher re-runs `sys.argv` in each worker. Under Hydra that is a known trap:
in a multirun, `sys.argv` holds the whole sweep (`-m pos=learned,rope`), so every worker would
start a sweep of its own, each with its own output directories. Instead, rank 0 writes the
job's composed config to the run directory and starts each worker on exactly that config, in
the same run directory. Setting LOCAL_RANK tells Lightning the processes exist already.

A job of several processes must also die as one. When a worker dies, the others would sit in
their next collective until NCCL's 30-minute timeout, holding their GPUs: rank 0 watches its
workers and ends them all. When rank 0 dies (killed, out of memory), the kernel ends its
workers (PR_SET_PDEATHSIG), so no orphan keeps a GPU.

Under SLURM or torchrun the processes are created by the cluster; nothing is launched here,
but every process must still know its *global* rank (rank zero prepares data and writes files)
and agree with the others on one run directory (`shared_stamp`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

POLL_S = 0.2  # how often rank 0 looks at its workers (a dead one is noticed this fast)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_saved_env: dict[str, str | None] = {}  # what launch_workers changed (clear_launch_env undoes)


def externally_launched() -> bool:
    """True when a cluster manager (or our own launcher) started this process."""
    return any(k in os.environ for k in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))


def global_rank() -> int:
    """This process's rank in the whole job, whoever launched it.

    torchrun (and our launcher) set RANK, srun sets SLURM_PROCID; LOCAL_RANK alone is the rank
    within one node, so under multi-node jobs it is 0 on every node's first process.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (local + 1)
    return node * per_node + local


def is_global_zero() -> bool:
    return global_rank() == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(returncode: int) -> str:
    """'died (signal 9)' for a killed process, 'exited with code 3' otherwise."""
    if returncode < 0:
        return f"died (signal {-returncode})"
    return f"exited with code {returncode}"


class WorkerGroup:
    """Ranks 1..n-1 of a single-node DDP job, started as `python -m <module> <args>`."""

    def __init__(self, procs: list[subprocess.Popen], first_rank: int = 1) -> None:
        self.procs = procs
        self.first_rank = first_rank
        self._stop = threading.Event()

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """If a worker dies with an error, end every other worker, then call
        `on_failure(message)` (from a watcher thread; it should end this process too).

        Without this, rank 0 and the surviving workers would wait in a collective for a peer
        that no longer exists.
        """

        def loop() -> None:
            while not self._stop.wait(POLL_S):
                for rank, p in enumerate(self.procs, start=self.first_rank):
                    rc = p.poll()
                    if rc not in (None, 0):
                        self.kill()
                        on_failure(f"DDP worker rank {rank} {describe_exit(rc)}; stopping")
                        return

        threading.Thread(target=loop, daemon=True, name="tinyllm-worker-watch").start()

    def dead_worker(self, wait_s: float = 2.0) -> str | None:
        """The watcher's message for a worker that exited with an error, else None.

        Rank 0's own collective fails the moment a dead peer's socket closes, which can be
        before the watcher's next poll (or before the peer's exit status is in): so a failure
        on rank 0 first asks here, waiting up to `wait_s`, and reports the cause, not gloo's
        "Connection reset by peer"."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, start=self.first_rank):
                rc = p.poll()
                if rc not in (None, 0):
                    return f"DDP worker rank {rank} {describe_exit(rc)}; stopping"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def wait(self, timeout: float = 120.0) -> list[int | None]:
        self._stop.set()
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        return [p.returncode for p in self.procs]

    def kill(self, grace_s: float = 2.0) -> None:
        """End every live worker: SIGTERM, then SIGKILL for any still alive after `grace_s`."""
        self._stop.set()
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def launch_workers(n_local: int, module: str, args: Sequence[str], cwd: str | Path) -> WorkerGroup:
    """Set this process up as local rank 0 and start local ranks 1..n_local-1."""
    node_rank = int(os.environ.get("NODE_RANK", 0))
    num_nodes = int(os.environ.get("TINYLLM_NUM_NODES", 1))
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    env["WORLD_SIZE"] = str(n_local * num_nodes)
    env["NODE_RANK"] = str(node_rank)
    env["LOCAL_WORLD_SIZE"] = str(n_local)
    # CPU DDP: split the cores between the processes instead of oversubscribing them.
    threads = max(1, (os.cpu_count() or 1) // n_local)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    preexec = _die_with_parent(os.getpid())
    own = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")
    for k in (*own, "LOCAL_RANK", "RANK"):
        _saved_env.setdefault(k, os.environ.get(k))
    procs = []
    for lr in range(1, n_local):
        # RANK too: a SLURM_PROCID inherited from an allocation must not make workers rank 0
        wenv = dict(env, LOCAL_RANK=str(lr), RANK=str(node_rank * n_local + lr))
        cmd = [sys.executable, "-m", module, *args]
        procs.append(subprocess.Popen(cmd, env=wenv, cwd=str(cwd), preexec_fn=preexec))
    for k in own:
        os.environ[k] = env[k]
    os.environ["LOCAL_RANK"] = "0"
    os.environ["RANK"] = str(node_rank * n_local)
    return WorkerGroup(procs, first_rank=node_rank * n_local + 1)


def clear_launch_env() -> None:
    """Forget the previous job's rendezvous (the next multirun job gets a fresh port).

    Only what launch_workers set is undone: under torchrun or srun the cluster's variables stay.
    """
    while _saved_env:
        k, v = _saved_env.popitem()
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# -- a lock for work that several processes may start at once -------------------------------------
@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "preparing") -> Iterator[None]:
    """Hold an exclusive lock on `.<folder name>.lock` beside the folder while the body runs.

    Two processes preparing the same data folder at once (two jobs, or several nodes sharing
    a file system) would interleave their writes; with the lock the second waits, then finds
    the folder prepared and reuses it. fcntl.flock: released by the kernel if the holder dies,
    so a crash leaves no stale lock. (Without fcntl, i.e. on Windows, nothing is locked.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # beside the folder, not in it: the folder holds exactly what prepare writes
    with open(folder.parent / f".{folder.name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"tinyllm: waiting: another process is {what} {folder}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- one run directory for every process of a job ----------------------------------------------
_STAMP_TIMEOUT = datetime.timedelta(minutes=10)
_keepalive: list[object] = []  # rank 0's store server must outlive the others' reads


def shared_stamp(fmt: str) -> str:
    """`datetime.now().strftime(fmt)`, but the same text in every process of one job.

    Hydra resolves `${now:...}` in each process, so under torchrun or srun the processes of
    one job (started a few ms apart) could name different run directories. conf/train.yaml
    names its run directory with `${run_stamp:...}` (this function) instead:
    - torchrun: rank 0's clock, shared through torchrun's rendezvous store;
    - srun (several tasks): the job's start time (SLURM_JOB_START_TIME), else `slurm-<job id>`;
    - a single process, or our own workers (given rank 0's directory): this process's clock.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return _stamp_from_store(fmt)
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        start = os.environ.get("SLURM_JOB_START_TIME", "").strip()
        job = os.environ["SLURM_JOB_ID"] + (
            f".{os.environ['SLURM_STEP_ID']}" if os.environ.get("SLURM_STEP_ID") else ""
        )
        if start.isdigit():
            t = datetime.datetime.fromtimestamp(int(start))
            return f"{t.strftime(fmt)}-slurm-{job}"
        return f"slurm-{job}"
    return datetime.datetime.now().strftime(fmt)


def _stamp_from_store(fmt: str) -> str:
    from torch.distributed import TCPStore

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = global_rank()
    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=not agent and rank == 0,  # (else torchrun's agent hosts the store)
        timeout=_STAMP_TIMEOUT,
        wait_for_workers=False,
        multi_tenant=not agent,  # the process group created later reuses this server
    )
    _keepalive.append(store)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"tinyllm/run_stamp/{restart}/{fmt}"
    if rank == 0:
        store.set(key, datetime.datetime.now().strftime(fmt))
    return store.get(key).decode()  # (blocks until rank 0 has set it)


def register_resolvers() -> None:
    """Make `${run_stamp:FORMAT}` available to the configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", shared_stamp, use_cache=True)
