"""Data: corpus sources -> prepare (text -> token bins) -> TokenBinDataModule; Q&A formatting.

Read in this order: sources.py (where text comes from), prepare.py (text -> train.bin/val.bin
+ meta.json), datamodule.py (bins -> (x, y) batches on one process or many); protocol.py is
what train.py asks of any DataModule (qa.py, the Q&A one, implements it too).
Names are imported lazily so `import tinyllm.data` does not pull in Lightning.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "TokenBinDataModule": "tinyllm.data.datamodule",
    "DataSettings": "tinyllm.data.protocol",
    "TrainingData": "tinyllm.data.protocol",
    "prepare_data": "tinyllm.data.prepare",
    "default_data_dir": "tinyllm.data.prepare",
    "read_meta": "tinyllm.data.prepare",
    "get_source": "tinyllm.data.sources",
    "iter_documents": "tinyllm.data.sources",
    "SOURCES": "tinyllm.data.sources",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tinyllm.data' has no attribute {name!r}")
