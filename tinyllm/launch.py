"""Starting the DDP worker processes ourselves (rank 0 is the process the user started).

Lightning's own launcher re-runs `sys.argv` in each worker. Under Hydra that is a known trap:
in a multirun, `sys.argv` holds the whole sweep (`-m pos=learned,rope`), so every worker would
start a sweep of its own, each with its own output directories. Instead, rank 0 writes the
job's composed config to the run directory and starts each worker on exactly that config, in
the same run directory. Setting LOCAL_RANK tells Lightning the processes exist already.

Under SLURM or torchrun the processes are created by the cluster; nothing is launched here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def externally_launched() -> bool:
    """True when a cluster manager (or our own launcher) started this process."""
    return any(k in os.environ for k in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """Ranks 1..n-1 of a single-node DDP job, started as `python -m <module> <args>`."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self._stop = threading.Event()

    def watch(self, on_failure: Callable[[int, int], None]) -> None:
        """Call `on_failure(rank, returncode)` (from a thread) if a worker dies with an error.

        Without this, rank 0 would wait in a collective for a peer that no longer exists.
        """

        def loop() -> None:
            while not self._stop.wait(1.0):
                for rank, p in enumerate(self.procs, start=1):
                    rc = p.poll()
                    if rc not in (None, 0):
                        on_failure(rank, rc)
                        return

        threading.Thread(target=loop, daemon=True).start()

    def wait(self, timeout: float = 120.0) -> list[int | None]:
        self._stop.set()
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        self._stop.set()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def launch_workers(n_local: int, module: str, args: Sequence[str], cwd: str | Path) -> WorkerGroup:
    """Set this process up as local rank 0 and start local ranks 1..n_local-1."""
    node_rank = int(os.environ.get("NODE_RANK", 0))
    num_nodes = int(os.environ.get("TINYLLM_NUM_NODES", 1))
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    env["WORLD_SIZE"] = str(n_local * num_nodes)
    env["NODE_RANK"] = str(node_rank)
    # CPU DDP: split the cores between the processes instead of oversubscribing them.
    threads = max(1, (os.cpu_count() or 1) // n_local)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    procs = []
    for local_rank in range(1, n_local):
        wenv = dict(env, LOCAL_RANK=str(local_rank))
        cmd = [sys.executable, "-m", module, *args]
        procs.append(subprocess.Popen(cmd, env=wenv, cwd=str(cwd)))
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"):
        os.environ[k] = env[k]
    os.environ["LOCAL_RANK"] = "0"
    return WorkerGroup(procs)


def clear_launch_env() -> None:
    """Forget the previous job's rendezvous (the next multirun job gets a fresh port)."""
    for k in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"):
        os.environ.pop(k, None)
