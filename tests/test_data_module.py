"""TokenBinDataModule: shapes, determinism, ranks, resume, validation windows, checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinyllm.data.datamodule import TokenBinDataModule, TrainBatches, ValBatches
from tinyllm.data.prepare import prepare_data
from tinyllm.errors import TinyLLMError

T, B = 16, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dm")
    (root / "c.txt").write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(600)))
    return prepare_data(
        {"source": "text", "path": str(root / "c.txt")}, {"vocab_size": 300}, root / "out"
    )


def _batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return out


def test_batches_shape_and_targets(data_dir: Path) -> None:
    dm = TokenBinDataModule(data_dir, T, B)
    tokens = np.fromfile(data_dir / "train.bin", dtype=dm.meta["dtype"])
    ds = dm.train_dataset()
    for step in (0, 1, 17):
        x, y = ds[step]
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, s in zip(x, ds.starts(step)):  # each row is a real window of the bin
            assert torch.equal(row, torch.from_numpy(tokens[s : s + T].astype(np.int64)))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (B, T)


def test_seeded_and_deterministic(data_dir: Path) -> None:
    a = _batches(TokenBinDataModule(data_dir, T, B, seed=1).train_dataloader(), 5)
    b = _batches(TokenBinDataModule(data_dir, T, B, seed=1).train_dataloader(), 5)
    c = _batches(TokenBinDataModule(data_dir, T, B, seed=2).train_dataloader(), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_workers_give_the_same_stream(data_dir: Path) -> None:
    a = _batches(TokenBinDataModule(data_dir, T, B).train_dataloader(), 6)
    dm = TokenBinDataModule(data_dir, T, B, num_workers=2)
    b = _batches(dm.train_dataloader(), 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert b[0][0].dtype == torch.int64 and b[0][0].is_contiguous()
    va = list(TokenBinDataModule(data_dir, T, B).val_dataloader())
    vb = list(dm.val_dataloader())
    assert len(va) == len(vb) and all(torch.equal(p[1], q[1]) for p, q in zip(va, vb))


def test_ranks_draw_different_rows_of_one_global_batch(data_dir: Path) -> None:
    path, dtype = data_dir / "train.bin", "uint16"
    one = TrainBatches(path, dtype, T, 2 * B, seed=3)
    ranks = [TrainBatches(path, dtype, T, B, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for step in range(40):
        s0, s1 = ranks[0].starts(step), ranks[1].starts(step)
        assert not np.array_equal(s0, s1)
        assert np.array_equal(np.concatenate([s0, s1]), one.starts(step))
        x0, _ = ranks[0][step]
        assert torch.equal(x0, one[step][0][:B])


def test_resume_continues_the_stream(data_dir: Path) -> None:
    ref = _batches(TokenBinDataModule(data_dir, T, B).train_dataloader(), 12)
    dm = TokenBinDataModule(data_dir, T, B)
    # a Trainer that has done 5 optimizer steps with 2 micro-batches each
    dm.trainer = SimpleNamespace(
        global_step=5, accumulate_grad_batches=2, global_rank=0, world_size=1
    )
    resumed = _batches(dm.train_dataloader(), 2)
    assert torch.equal(resumed[0][0], ref[10][0]) and torch.equal(resumed[1][0], ref[11][0])
    assert dm.state_dict()["position"] == 10
    # without a Trainer: the state dict carries the position
    fresh = TokenBinDataModule(data_dir, T, B)
    it = iter(fresh.train_dataloader())
    for _ in range(3):  # num_workers=0: the sampler hands out exactly what is consumed
        next(it)
    state = fresh.state_dict()
    assert state["position"] == 3
    other = TokenBinDataModule(data_dir, T, B)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(next(iter(other.train_dataloader()))[0], ref[3][0])
    bad = dict(state, tokenizer_sha256="0" * 64)
    with pytest.raises(TinyLLMError, match="another tokenizer"):
        other.load_state_dict(bad)


def test_epochs_continue_rather_than_restart(data_dir: Path) -> None:
    dm = TokenBinDataModule(data_dir, T, B, epoch_steps=3)
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == 3
    ref = _batches(TokenBinDataModule(data_dir, T, B).train_dataloader(), 6)
    assert torch.equal(second[0][0], ref[3][0])


def test_val_windows_identical_across_world_sizes(data_dir: Path) -> None:
    path = data_dir / "val.bin"
    n = len(np.fromfile(path, dtype=np.uint16))
    full = ValBatches(path, "uint16", T, B)
    assert len(full.all_starts) == (n - 1) // T  # every non-overlapping window
    assert np.all(np.diff(full.all_starts) == T)
    for world in (1, 2, 3):
        shards = [ValBatches(path, "uint16", T, B, None, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate([s.starts for s in shards]), full.all_starts)
        rows = torch.cat([torch.cat([s[i][0] for i in range(len(s))]) for s in shards])
        assert rows.shape == (len(full.all_starts), T)  # no padding, nothing repeated
    few = ValBatches(path, "uint16", T, B, num_windows=3)
    assert len(few.all_starts) == 3 and few.all_starts[0] == 0
    assert few.all_starts[-1] == full.all_starts[-1]  # evenly spread over the split
    dm = TokenBinDataModule(data_dir, T, B, val_windows=5)
    assert sum(x.shape[0] for x, _ in dm.val_dataloader()) == 5
    a = [x for x, _ in dm.val_dataloader()]
    b = [x for x, _ in dm.val_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_check_compatible_and_small_splits(data_dir: Path) -> None:
    dm = TokenBinDataModule(data_dir, T, B)
    dm.check_compatible({"vocab_size": 300, "block_size": T})
    dm.check_compatible({"vocab_size": 320, "block_size": 2 * T})  # a padded vocab, longer context
    with pytest.raises(TinyLLMError, match="model.vocab_size=256 is smaller"):
        dm.check_compatible({"vocab_size": 256, "block_size": T})
    with pytest.raises(TinyLLMError, match="exceeds the model's block_size=8"):
        dm.check_compatible({"vocab_size": 300, "block_size": 8})
    huge = TokenBinDataModule(data_dir, 100_000, B)
    with pytest.raises(TinyLLMError, match="fewer than one window"):
        huge.check_compatible({"vocab_size": 300, "block_size": 100_000})
    with pytest.raises(TinyLLMError, match="fewer than one window"):
        huge.train_dataset()
    with pytest.raises(TinyLLMError, match="validation split .* fewer than one"):
        huge.val_dataset()


def test_tokenizer_and_meta_checks(data_dir: Path, tmp_path: Path) -> None:
    dm = TokenBinDataModule(data_dir, T, B)
    assert dm.tokenizer.vocab_size == dm.meta["vocab_size"]
    with pytest.raises(TinyLLMError, match="has no meta.json"):
        TokenBinDataModule(tmp_path, T, B)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["tokenizer_sha256"] = "f" * 64
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TinyLLMError, match="does not match meta.json's tokenizer_sha256"):
        _ = TokenBinDataModule(copy, T, B).tokenizer


def test_lightning_resume_mid_epoch_equals_uninterrupted(data_dir: Path, tmp_path: Path) -> None:
    """With a real Trainer: stop after 3 optimizer steps (x2 accumulation, mid-epoch: epochs
    of 7 micro-batches round up to 4 steps), resume from the checkpoint, and the model sees
    exactly the batches of an uninterrupted run, across the epoch boundary too."""
    import warnings

    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, i):
            x, _ = batch
            self.seen.append(x[:, 0].tolist())
            return (self.w * x.float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(steps: int, ckpt: str | None = None) -> tuple[list, L.Trainer]:
        model = Probe()
        trainer = L.Trainer(
            max_steps=steps,
            accumulate_grad_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=tmp_path,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, TokenBinDataModule(data_dir, T, B, epoch_steps=7), ckpt_path=ckpt)
        return model.seen, trainer

    full, _ = run(6)
    first, trainer = run(3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    rest, _ = run(6, str(tmp_path / "mid.ckpt"))
    assert len(full) == 12 and first + rest == full
