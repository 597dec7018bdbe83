"""`python -m tinyllm.inspect run=RUN_DIR step=N`: the text a training step trained on.

A training batch is a pure function of (data seed, step, rank, world size) (see
data/datamodule.py), so the batch behind a loss spike can be rebuilt long after the run: the
health callback records in metrics.json which data folder, seed and batch layout the run used,
and this command draws the same windows again and decodes them. Step N means the 0-based
optimizer step of the spike records and of TensorBoard; with gradient accumulation it
consumed micro-batches N*A .. N*A + A - 1 on every rank.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tinyllm.errors import TinyLLMError, exit_on_user_error


def batch_source(run_dir: str | Path) -> tuple[dict[str, Any], int]:
    """(the run's recorded batch layout, its number of finished steps) from metrics.json."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise TinyLLMError(
            f"{run_dir} holds no metrics.json: it is not a tinyllm run directory (or the run "
            "never started). Pass run=<the folder with metrics.json, checkpoints/ and tb/>."
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLLMError(f"{path} is not valid JSON ({e}).") from None
    src = (metrics.get("health") or {}).get("batches")
    if not src:
        raise TinyLLMError(
            f"{path} does not record the run's batch layout (health.batches): the run was "
            "trained on Q&A data, or by a tinyllm without run-health telemetry. Batches of "
            "token-bin corpora can be rebuilt only from runs that recorded it."
        )
    return src, int(metrics.get("step") or 0)


def batch_texts(
    src: dict[str, Any], step: int, rank: int | None = None, row: int | None = None
) -> Iterator[tuple[int, int, int, int, str]]:
    """(rank, micro-batch, row, window start, text) of every window `step` trained on."""
    from tinyllm.data.datamodule import TrainBatches
    from tinyllm.tokenizer import BPETokenizer

    data_dir = Path(src["data_dir"])
    tokenizer = BPETokenizer.load(data_dir / "tokenizer.json")
    world, accum = int(src["world_size"]), int(src["accumulate_grad_batches"])
    for r in range(world) if rank is None else [rank]:
        ds = TrainBatches(
            data_dir / "train.bin",
            src["dtype"],
            int(src["block_size"]),
            int(src["batch_size"]),
            seed=int(src["seed"]),
            rank=r,
            world_size=world,
        )
        for m in range(accum):
            micro = step * accum + m  # micro-batches consumed before this one
            starts = ds.starts(micro)
            rows = ds.bin.rows(starts, ds.block_size + 1)  # (B, T + 1)
            for i in range(len(rows)) if row is None else [row]:
                yield r, m, i, int(starts[i]), tokenizer.decode(rows[i].tolist())


def _int_opt(cfg: DictConfig, key: str, low: int, high: int | None, what: str) -> int | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v >= high):
        span = f"{low}..{high - 1}" if high is not None else f">= {low}"
        raise TinyLLMError(f"{key}={v!r} is not a valid {what}: use an integer in {span}.")
    return v


def run(cfg: DictConfig) -> None:
    if not cfg.get("run"):
        raise TinyLLMError("Say which run: python -m tinyllm.inspect run=RUN_DIR step=N.")
    src, steps_done = batch_source(cfg.run)
    if cfg.get("step") is None:
        raise TinyLLMError(f"Say which step: step=N, with N in 0..{steps_done - 1}.")
    step = _int_opt(cfg, "step", 0, steps_done, f"step of this run ({steps_done} steps done)")
    rank = _int_opt(cfg, "rank", 0, int(src["world_size"]), "rank")
    row = _int_opt(cfg, "row", 0, int(src["batch_size"]), "row of a micro-batch")
    print(
        f"# {cfg.run}: step {step} = micro-batch(es) {step * src['accumulate_grad_batches']}.."
        f"{(step + 1) * src['accumulate_grad_batches'] - 1} on each of {src['world_size']} "
        f"rank(s); windows of {src['block_size'] + 1} tokens from {src['data_dir']}/train.bin"
    )
    for r, m, i, start, text in batch_texts(src, step, rank, row):
        print(f"\n## rank {r}, micro-batch {m}, row {i} (tokens {start}..)\n{text}")


@hydra.main(config_path="../conf", config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        with exit_on_user_error():
            run(cfg)
    except BrokenPipeError:  # `... | head` closed the pipe
        sys.stderr.close()


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(main, "inspect")
