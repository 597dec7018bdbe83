"""The one interface between train.py and any training data.

train.py never asks which kind of data it has. The `data` config group names a builder with
`_target_` (conf/data/*.yaml: `TokenBinDataModule.from_config` for corpora, and
`QADataModule.from_config` for Q&A files); train.py calls it with the group's own options and
a `DataSettings`, and gets back a LightningDataModule that also offers:

    .tokenizer                 the tokenizer its ids come from (saved in every checkpoint)
    .meta                      dict; meta["splits"][split] has "tokens" and "bytes", so
                               validation can report bits per UTF-8 byte (bytes 0: unknown)
    .chat_template             a ChatTemplate the examples were encoded with, or None
    .check_compatible(model)   raise TinyLLMError unless a model of this config can train on it
    .callbacks()               Lightning callbacks this data needs (e.g. Q&A exact match)

A new kind of data is a new builder and a conf/data file; train.py does not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DEFAULT_BUILDER = "tinyllm.data.datamodule.TokenBinDataModule.from_config"


@dataclass(frozen=True)
class DataSettings:
    """What a data builder gets from the run's config besides its own `data` group."""

    block_size: int
    batch_size: int
    seed: int  # the order of the training examples (data_seed)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # the `tokenizer` group
    num_workers: int = 0  # loader.num_workers
    val_windows: int | None = None  # loader.val_windows
    data_root: str = "data"
    data_dir: str | None = None  # an already prepared folder: used as it is
    force_prepare: bool = False
    init_from: str | None = None  # fine-tuning: reuse this checkpoint's tokenizer
    rank_zero: bool = True  # only rank zero prepares; the others wait for it


@runtime_checkable
class TrainingData(Protocol):
    """What train.py relies on (beyond LightningDataModule's loaders)."""

    @property
    def tokenizer(self) -> Any: ...

    meta: dict[str, Any]

    @property
    def chat_template(self) -> Any: ...

    def check_compatible(self, model_config: Mapping[str, Any]) -> None: ...

    def callbacks(self) -> list[Any]: ...


def split_bytes(meta: Mapping[str, Any] | None, split: str = "val") -> int | None:
    """UTF-8 bytes of a split's targets per meta.json, or None when they are not known."""
    try:
        n = int(meta["splits"][split]["bytes"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    return n if n > 0 else None
