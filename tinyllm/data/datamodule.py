"""TokenBinDataModule: token bins -> (x, y) batches, on one process or many.

Training draws random windows of block_size + 1 tokens (x = the first T, y = the last T).
Every batch is a pure function of (seed, step, rank, world size):

    start of global row j at `step` = hash(seed, step, j) mod (n - T)
    this rank's rows: j in [rank * batch_size, (rank + 1) * batch_size)

so ranks draw different windows, the union over ranks is exactly the batch one process with
batch_size * world_size would see, and resuming only needs the step: the sampler starts at
`trainer.global_step * accumulate_grad_batches` (micro-batches already consumed).

Validation uses fixed non-overlapping windows (all of them by default, or `val_windows`
evenly spaced ones), the same on every run; each rank takes a contiguous share, no padding.

Speed: a whole batch is one numpy fancy-index on the memmap (no per-sample Python), and the
DataLoader runs with batch_size=None so nothing is collated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tinyllm.data.prepare import SPLITS, default_data_dir, prepare_data, read_meta
from tinyllm.data.protocol import DataSettings
from tinyllm.errors import TinyLLMError


def file_identity(path: Path) -> tuple[int, int, int]:
    """(device, inode, size): changes when the file is replaced (prepare renames new bins in)."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size


class _Bin:
    """A token bin opened lazily: each DataLoader worker maps the file itself (never pickled).

    Two guards (TokenBinDataModule sets them): `identity`, the file as the run first saw it,
    so a bin that another prepare replaced meanwhile is refused instead of silently mixed in
    (an open map keeps reading the old file, which stays whole); and `vocab_size`, so an id
    beyond the vocabulary is a clear error naming the file, not an IndexError in the model.
    """

    def __init__(self, path: Path, dtype: str) -> None:
        self.path, self.dtype = Path(path), dtype
        self._data: np.ndarray | None = None
        self._offsets: dict[int, np.ndarray] = {}
        self.identity: tuple[int, int, int] | None = None
        self.vocab_size: int | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            if self.identity is not None and file_identity(self.path) != self.identity:
                raise TinyLLMError(
                    f"{self.path} was replaced while this run was using it (another prepare "
                    "rewrote the folder: force=true, or its source changed). Training on would "
                    "mix two datasets. Restart the run; give concurrent runs separate folders "
                    "(the default folder names differ by source and settings)."
                )
            # a plain ndarray view of the map: indexing it skips np.memmap's subclass overhead
            self._data = np.asarray(np.memmap(self.path, dtype=self.dtype, mode="r"))
        return self._data

    def __len__(self) -> int:
        return self.path.stat().st_size // np.dtype(self.dtype).itemsize

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_offsets": {}}

    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """data[s : s + length] for each start -> int64 array [len(starts), length]."""
        if length not in self._offsets:
            self._offsets[length] = np.arange(length, dtype=np.int64)
        idx = starts[:, None] + self._offsets[length]  # (N, length)
        out = self.data[idx]
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            raise TinyLLMError(
                f"{self.path} holds token id {int(out.max())}, beyond the vocabulary of its "
                f"folder ({self.vocab_size} ids): the bin was written with another tokenizer "
                "or is corrupted. Prepare the folder again (python -m tinyllm.prepare ... "
                "force=true)."
            )
        return out.astype(np.int64)


def to_xy(rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of T + 1 tokens (B, T + 1) -> x (B, T) the inputs, y (B, T) the next tokens;
    contiguous, so `.view(-1)` works on them."""
    rows = torch.as_tensor(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


BLOCK_STEPS = 16  # training batches gathered at once (amortises numpy's per-call overhead)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a stateless, well-mixed uint64 -> uint64 hash (vectorised)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TrainBatches(Dataset):
    """Index = micro-batch step; item = this rank's whole (x, y) batch for that step."""

    def __init__(
        self,
        path: str | Path,
        dtype: str,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.bin = _Bin(Path(path), dtype)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.high = len(self.bin) - block_size  # exclusive bound on starts (window = T + 1)
        self._block: int | None = None
        self._rows: np.ndarray | None = None
        if self.high < 1:
            raise TinyLLMError(
                f"{path} holds {len(self.bin)} tokens, fewer than one window of block_size + 1 "
                f"= {block_size + 1}. Use a larger corpus or a smaller model.block_size."
            )

    def starts(self, step: int) -> np.ndarray:
        """Window starts of this rank's rows at `step` (int64 [batch_size])."""
        return self._block_starts(step, 1)

    def _block_starts(self, first: int, steps: int) -> np.ndarray:
        """Starts for `steps` consecutive steps from `first`, flat [steps * batch_size].

        A counter-based hash of (seed, step, global row): any step is reachable in O(1)
        (resume, any rank layout) and a block costs a handful of vectorised numpy ops (a
        seeded np.random.Generator per step would cost ~50x more)."""
        b = self.batch_size
        row = np.arange(self.rank * b, (self.rank + 1) * b, dtype=np.uint64)  # global rows
        step = np.arange(first, first + steps, dtype=np.uint64)[:, None]
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            key = _mix(np.asarray([self.seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
            h = _mix(key ^ _mix(step * np.uint64(self.batch_size * self.world_size) + row))
        # (steps, B) -> (steps * B,); the modulo bias is < high / 2**64: negligible
        return (h.reshape(-1) % np.uint64(self.high)).astype(np.int64)

    def rows(self, step: int) -> np.ndarray:
        """This rank's windows at `step`: int64 [batch_size, block_size + 1]."""
        # Steps come in order, so windows are gathered for a block of steps at once and
        # handed out in slices: one numpy gather per BLOCK_STEPS batches.
        block, i = divmod(int(step), BLOCK_STEPS)
        if self._block != block:
            starts = self._block_starts(block * BLOCK_STEPS, BLOCK_STEPS)
            self._rows = self.bin.rows(starts, self.block_size + 1)
            self._block = block
        return self._rows[i * self.batch_size : (i + 1) * self.batch_size]  # (B, T + 1)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_xy(self.rows(step))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_block": None, "_rows": None}


class StepSampler(Sampler[int]):
    """Yields step numbers from `position` on; the main process owns it, so its position
    is the true count of batches handed out (workers only see the numbers)."""

    def __init__(self, length: int, position: int = 0) -> None:
        self.length, self.position = length, position

    def __iter__(self) -> Iterator[int]:
        # one "epoch" = `length` steps; the stream continues across epochs, never restarts
        for _ in range(self.length):
            step = self.position
            self.position += 1
            yield step

    def __len__(self) -> int:
        return self.length


class _Rows(Dataset):
    """Worker-side view of a dataset: items are numpy rows (B, T + 1). A numpy array travels
    to the main process through the worker's pipe; a torch tensor would get a shared-memory
    segment of its own per batch, which costs far more than a small batch itself."""

    def __init__(self, dataset: TrainBatches | ValBatches) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset.rows(i)


def _identity(item: Any) -> Any:
    return item


class BatchLoader(DataLoader):
    """A DataLoader of whole (x, y) batches. With workers, they send numpy rows and the
    main process makes the tensors (and pins them for the GPU when asked)."""

    def __init__(self, dataset: Any, num_workers: int = 0, pin: bool = False, **kw: Any) -> None:
        self.rows_mode = num_workers > 0
        self.pin = pin
        if self.rows_mode:
            dataset, kw["collate_fn"] = _Rows(dataset), _identity
        super().__init__(
            dataset,
            batch_size=None,  # items are whole batches already
            num_workers=num_workers,
            pin_memory=pin and not self.rows_mode,
            **kw,
        )

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        if not self.rows_mode:
            yield from it
            return
        for rows in it:
            x, y = to_xy(rows)
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)


class StepLoader(BatchLoader):
    """The training loader: Lightning saves and restores its position with the checkpoint
    (it is "stateful" to Lightning, so mid-epoch resumes are known to be exact)."""

    def __init__(self, *args: Any, position_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn

    def state_dict(self) -> dict[str, int]:
        sampler: StepSampler = self.sampler  # type: ignore[assignment]
        return {"position": self._position_fn() if self._position_fn else sampler.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.position = int(state["position"])  # type: ignore[attr-defined]


class ValBatches(Dataset):
    """Fixed non-overlapping windows [k*T, k*T + T + 1), this rank's contiguous share."""

    def __init__(
        self,
        path: str | Path,
        dtype: str,
        block_size: int,
        batch_size: int,
        num_windows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.bin = _Bin(Path(path), dtype)
        self.block_size, self.batch_size = block_size, batch_size
        total = (len(self.bin) - 1) // block_size
        if total < 1:
            raise TinyLLMError(
                f"The validation split {path} holds {len(self.bin)} tokens, fewer than one "
                f"window of block_size + 1 = {block_size + 1}. Prepare with a larger "
                "data.val_fraction / data.val_tokens, or use a smaller model.block_size."
            )
        k = total if num_windows is None else max(1, min(int(num_windows), total))
        # k of the total windows, evenly spaced over the split (all of them by default)
        chosen = np.linspace(0, total - 1, k).round().astype(np.int64) if k < total else None
        all_starts = (chosen if chosen is not None else np.arange(total)) * block_size
        self.all_starts = all_starts  # identical for every rank layout
        self.starts = np.array_split(all_starts, world_size)[rank]

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def rows(self, i: int) -> np.ndarray:
        starts = self.starts[i * self.batch_size : (i + 1) * self.batch_size]
        return self.bin.rows(starts, self.block_size + 1)  # (B, T + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_xy(self.rows(i))


class TokenBinDataModule(L.LightningDataModule):
    """Batches of (x, y) LongTensor [B, T] from a folder written by tinyllm.prepare."""

    def __init__(
        self,
        data_dir: str | Path,
        block_size: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        val_windows: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        epoch_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        # the bins as they were when meta.json was read (see _Bin.identity)
        self._identity = {f"{s}.bin": file_identity(self.data_dir / f"{s}.bin") for s in SPLITS}
        self.block_size, self.batch_size = int(block_size), int(batch_size)
        self.num_workers, self.seed, self.val_windows = int(num_workers), int(seed), val_windows
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.epoch_steps = epoch_steps
        self._tokenizer: Any = None
        self._sampler: StepSampler | None = None
        self._loaded_position: int | None = None

    # ------------------------------------------------------------------ checks and tokenizer
    @property
    def tokenizer(self) -> Any:
        """The tokenizer the bins were written with (checked against meta's sha256)."""
        if self._tokenizer is None:
            from tinyllm.tokenizer import BPETokenizer

            tok = BPETokenizer.load(self.data_dir / "tokenizer.json")
            if tok.sha256() != self.meta["tokenizer_sha256"]:
                raise TinyLLMError(
                    f"{self.data_dir}/tokenizer.json does not match meta.json's tokenizer_sha256:"
                    " the bins were written with another tokenizer. Re-run "
                    f"`python -m tinyllm.prepare ... out_dir={self.data_dir} force=true`."
                )
            self._tokenizer = tok
        return self._tokenizer

    @classmethod
    def from_config(cls, settings: DataSettings, **data_cfg: Any) -> TokenBinDataModule:
        """The builder of conf/data/<corpus>.yaml: prepare the corpus (rank zero, once; reused
        when its content hash matches) and open its bins. `data_cfg` is the `data` group."""
        if settings.data_dir:  # an already prepared folder: used as it is, never written to
            out = Path(settings.data_dir)
        else:
            out = default_data_dir(data_cfg, settings.tokenizer, settings.data_root)
            if settings.rank_zero:
                # Our own workers start after this, so the bins exist before any opens them.
                out = prepare_data(data_cfg, settings.tokenizer, out, settings.force_prepare)
            else:
                # Under SLURM/torchrun every rank starts at once: wait for rank zero's prepare.
                _wait_for(out / "meta.json")
                from tinyllm.launch import folder_lock

                with folder_lock(out, "preparing"):  # (returns once no prepare holds the folder)
                    pass
        return cls(
            out,
            block_size=settings.block_size,
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
            seed=settings.seed,
            val_windows=settings.val_windows,
        )

    @property
    def chat_template(self) -> None:
        return None  # plain text: no template

    def callbacks(self) -> list[L.Callback]:
        return []

    def check_compatible(self, model_config: Mapping[str, Any]) -> None:
        """Raise TinyLLMError unless a model of this config can train on these bins."""
        vocab_size, block_size = model_config["vocab_size"], model_config["block_size"]
        need = int(self.meta["vocab_size"])
        if int(vocab_size) < need:
            raise TinyLLMError(
                f"model.vocab_size={vocab_size} is smaller than the data's vocabulary ({need} "
                f"ids, {self.data_dir}/meta.json): token ids would index past the embedding. "
                f"Set model.vocab_size={need} (or larger) or prepare with a smaller "
                "tokenizer.vocab_size."
            )
        if self.block_size > int(block_size):
            raise TinyLLMError(
                f"The data module's block_size={self.block_size} exceeds the model's "
                f"block_size={block_size}; use the same value for both."
            )
        for split in ("train", "val"):
            n = int(self.meta["splits"][split]["tokens"])
            if n < self.block_size + 1:
                raise TinyLLMError(
                    f"The {split} split of {self.data_dir} has {n} tokens, fewer than one "
                    f"window of block_size + 1 = {self.block_size + 1}. Lower block_size, "
                    "or prepare more text (a larger corpus or a larger data.val_fraction)."
                )

    # ------------------------------------------------------------------ distributed layout
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def _start_position(self) -> int:
        """Micro-batches already consumed: from the Trainer when attached (resume continues
        the same stream), else from load_state_dict, else 0."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_step) * int(trainer.accumulate_grad_batches)
        return self._loaded_position or 0

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, sampler: StepSampler | None = None) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else bool(self.pin_memory)
        kw: dict[str, Any] = {}
        if sampler is not None:
            kw["position_fn"] = self._start_position if self._attached() else None
        return (StepLoader if sampler is not None else BatchLoader)(
            dataset,
            num_workers=self.num_workers,
            pin=pin,
            sampler=sampler,
            shuffle=False,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
            **kw,
        )

    def _guarded(self, ds: Any) -> Any:
        """The bins' guards: the files this run started with, ids within the vocabulary."""
        ds.bin.identity = self._identity[ds.bin.path.name]
        ds.bin.vocab_size = int(self.meta["vocab_size"])
        return ds

    def train_dataset(self) -> TrainBatches:
        rank, world = self._rank_world()
        size = (self.block_size, self.batch_size)
        ds = TrainBatches(self._bin("train"), self.meta["dtype"], *size, self.seed, rank, world)
        return self._guarded(ds)

    def val_dataset(self) -> ValBatches:
        rank, world = self._rank_world()
        size = (self.block_size, self.batch_size)
        ds = ValBatches(self._bin("val"), self.meta["dtype"], *size, self.val_windows, rank, world)
        return self._guarded(ds)

    def _bin(self, split: str) -> Path:
        return self.data_dir / f"{split}.bin"

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        if self.epoch_steps is not None:
            length = int(self.epoch_steps)
        else:  # one "epoch" ~ one pass over the training tokens
            length = len(ds.bin) // (self.block_size * self.batch_size * ds.world_size)
        length = max(1, length)
        if self._attached():
            # whole optimizer steps per epoch: Lightning steps on a partial accumulation at an
            # epoch's end, which would break position = global_step * accumulate_grad_batches
            accum = int(self.trainer.accumulate_grad_batches)
            length = -(-length // accum) * accum
        self._sampler = StepSampler(length, self._start_position())
        return self._loader(ds, self._sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset())

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """{seed, position, tokenizer_sha256}. Position: micro-batches consumed per the Trainer
        when attached; else the batches the sampler handed out (with workers that includes
        the ones prefetched but not yet used)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            position = self._start_position()
        elif self._sampler is not None:
            position = self._sampler.position
        else:
            position = self._loaded_position or 0
        return {
            "seed": self.seed,
            "position": position,
            "tokenizer_sha256": self.meta["tokenizer_sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            state.get("tokenizer_sha256", self.meta["tokenizer_sha256"])
            != self.meta["tokenizer_sha256"]
        ):
            raise TinyLLMError(
                f"The checkpoint was trained on data with another tokenizer than {self.data_dir} "
                "(tokenizer_sha256 differs); resume with the same data folder."
            )
        self.seed = int(state.get("seed", self.seed))
        self._loaded_position = int(state.get("position", 0))
        if self._sampler is not None:
            self._sampler.position = self._loaded_position


def _wait_for(path: Path, timeout_s: float = 6 * 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TinyLLMError(
                f"Waited {timeout_s:.0f} s for rank zero to prepare {path.parent}. Prepare the "
                "data once beforehand (`python -m tinyllm.prepare ...`) and pass data_dir=."
            )
        time.sleep(2.0)
