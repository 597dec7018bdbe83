"""File helpers used everywhere: atomic writes, checksums, compile-wrapper names.

Why atomic: a run can be killed at any moment (a time limit, Ctrl-C, a full disk). Every file
tinyllm writes goes to a temporary name in the same folder first and is renamed into place,
so a reader sees the old file or the new one, never half of one; the temporary file is
removed when the write fails. `os.replace` is atomic on one file system, hence "same folder".
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyllm.errors import TinyLLMError

COMPILE_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts in front of state-dict keys


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    A full disk is one clear error naming `path` (TinyLLMError); the previous file at `path`
    is untouched. The temporary's name carries our pid, so a later start can tell a killed
    writer's leftover from a live write (remove_stale_temporaries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (a fresh name per write, not mkstemp: that would leave the file readable by us alone)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if _disk_full(e):
            raise TinyLLMError(disk_full_message(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)  # (gone after a successful rename)
    return path


def disk_full_message(path: str | Path) -> str:
    return (
        f"disk full at {path}: the file could not be written (no space left on the device, "
        "or the quota is used up). Nothing half-written was kept, and the previous file of "
        "that name (if any) is intact. Free some space (old runs under outputs/, step-N.ckpt "
        "files) or point the run elsewhere, then resume from the last checkpoint."
    )


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (torch's zip writer reports a full disk
    as "inline_container.cc: unexpected pos", with the OSError as its context)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


# Temporary names of tinyllm's atomic writes, with the writer's pid: `.last.ckpt.123.1a2b3c4d.tmp`
# (atomic_write), and older ones: `.train.bin.tmp-123`, `.tokenizer.json.tmp123`.
_TMP_PID = re.compile(r"^\..+?(?:\.tmp-?(\d+)|\.(\d+)(?:\.[0-9a-f]{8})?\.tmp)$")
LEGACY_TMP_AGE_S = 3600.0  # a temporary without a pid (older mkstemp names): stale after this


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporaries left in `folder` by writers that were killed (kill -9 skips every
    cleanup): those whose pid is no longer running on this machine, and pid-less ones older
    than LEGACY_TMP_AGE_S. Returns what was removed. Live writers' files are left alone."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not p.name.startswith(".") or ".tmp" not in p.name:
            continue
        m = _TMP_PID.match(p.name)
        pid = int(m.group(1) or m.group(2)) if m else None
        try:
            if pid is not None and pid < 1 << 22:  # (pid_max on Linux is at most 2^22)
                stale = not _pid_alive(pid)
            else:
                age = time.time() - p.stat().st_mtime
                stale = p.name.endswith(".tmp") and age > LEGACY_TMP_AGE_S
            if stale and p.is_file():
                p.unlink()
                removed.append(p)
        except OSError:  # (gone meanwhile, or not ours to delete)
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Strict JSON with an indent and a final newline; tensors become numbers.

    JSON has no NaN or infinity (Python's json would write the bare words, which strict
    readers such as jq or JavaScript reject): a non-finite float is written as the string
    "NaN", "Infinity" or "-Infinity", which `float()` reads back. A diverged run's val/loss
    stays visibly NaN instead of turning into null or 0."""
    text = json.dumps(_finite_json(data), indent=2, default=_json_default, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def _finite_json(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return "NaN" if o != o else ("Infinity" if o > 0 else "-Infinity")
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    if hasattr(o, "numel") and hasattr(o, "tolist"):  # a tensor (without importing torch)
        return _finite_json(o.item() if o.numel() == 1 else o.tolist())
    return o


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda p: _torch_save(obj, p))


def _torch_save(obj: Any, p: Path) -> None:
    import torch

    # through a Python file: a full disk then raises OSError(ENOSPC) (given a path, torch's
    # C++ writer loses the errno: "inline_container.cc: unexpected pos")
    with open(p, "wb") as f:
        torch.save(obj, f)


def _json_default(o: Any) -> Any:
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
