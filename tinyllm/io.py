"""File helpers used everywhere: atomic writes, checksums, compile-wrapper names.

Why atomic: a run can be killed at any moment (a time limit, Ctrl-C, a full disk). Every file
tinyllm writes goes to a temporary name in the same folder first and is renamed into place,
so a reader sees the old file or the new one, never half of one; the temporary file is
removed when the write fails. `os.replace` is atomic on one file system, hence "same folder".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPILE_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts in front of state-dict keys


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (a fresh name per write, not mkstemp: that would leave the file readable by us alone)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone after a successful rename)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """JSON with an indent and a final newline; tensors become numbers, NaN/inf become null."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def _json_default(o: Any) -> Any:
    if hasattr(o, "numel") and hasattr(o, "tolist"):  # a tensor (without importing torch)
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def sha256_file(path: str | Path) -> str:
    """The file's sha256 as hex, read in 1 MiB chunks (corpora can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`model._orig_mod.blocks.0...` -> `model.blocks.0...`: checkpoint keys never carry the
    compile wrapper's name, so they load into a plain GPT. Returns the same dict, edited."""
    for k in [k for k in state_dict if COMPILE_PREFIX in k]:
        state_dict[k.replace(COMPILE_PREFIX, "")] = state_dict.pop(k)
    return state_dict


def unwrap_compiled(model: Any) -> Any:
    """The module inside a torch.compile wrapper (or the module itself)."""
    return getattr(model, COMPILE_PREFIX.rstrip("."), model)
