"""Self-describing checkpoints: weights + model config + tokenizer in one `.ckpt` file.

A tinyllm checkpoint is a Lightning checkpoint whose `hyper_parameters` hold only plain values
(`model_config`, `tokenizer`, ...), so `generate`, `export` and notebooks rebuild everything
from the file alone: no conf/ tree, no data folder. State-dict keys are `model.<GPT key>`;
keys written by a compiled model (`_orig_mod.`) are normalised away on load.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tinyllm.errors import TinyLLMError
from tinyllm.io import strip_compile_prefix, torch_save_atomic, unwrap_compiled

CKPT_FORMAT_VERSION = 1
_PREFIX = "model."
CHECKSUM_KEY = "tinyllm_checksum"  # sha256 of every tensor in the file (see tensors_checksum)


def _clean_key(key: str) -> str:
    """`model.blocks.0...` -> `blocks.0...` (the LitGPT attribute the GPT sits in)."""
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def tensors_checksum(obj: Any) -> str:
    """sha256 over every tensor in a checkpoint (name, dtype, shape and bytes), in a fixed order.

    Stored under CHECKSUM_KEY at save and recomputed at load: a flipped byte in the weights or
    the optimizer state would otherwise load silently (and generate or resume from garbage).
    Each tensor is hashed on its own, in threads (hashlib releases the GIL), and the digests
    hashed in order: the cost spreads over the cores (benchmarks/checksum.py).
    """
    items = list(_tensors(obj, ""))
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_tensor_digest, items))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    name, t = item
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def _tensors(obj: Any, name: str):
    """(path, tensor) pairs of a nested dict/list structure, dict keys in sorted order."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k != CHECKSUM_KEY:
                yield from _tensors(obj[k], f"{name}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}/{i}")


def add_checksum(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Store the tensors' checksum in the checkpoint dict (in place) before it is saved."""
    ckpt[CHECKSUM_KEY] = tensors_checksum(ckpt)
    return ckpt


def verify_checksum(ckpt: dict[str, Any], path: str | Path) -> None:
    """Recompute the checksum written at save; files from before checksums pass unchecked."""
    stored = ckpt.get(CHECKSUM_KEY) if isinstance(ckpt, dict) else None
    if stored is None:
        return
    if stored != tensors_checksum(ckpt):
        raise TinyLLMError(
            f"Checkpoint '{path}' is corrupted: its tensors do not match the checksum written "
            "when it was saved (a bit flip on disk, a bad copy or an edit). Do not use it: "
            "copy it again from its source, or use another checkpoint of the run (e.g. "
            "best.ckpt or step-N.ckpt beside it)."
        )


def load_trusted_types_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with the safe unpickler only (tensors and plain values), checksum verified.

    Never falls back to the full unpickler: a crafted .ckpt could run code through it. A
    tinyllm checkpoint holds nothing else (tests/test_safety.py pins that), so nothing is
    allowlisted beyond torch's own weights_only set.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # (a crafted pickle names a global it wants called; garbage is an unknown opcode)
        first = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), "").strip()
        if not first:
            raise TinyLLMError(_unreadable(path, e)) from None
        raise TinyLLMError(
            f"Refusing to load '{path}': it holds Python objects besides tensors and plain "
            f"values ({first or type(e).__name__}), which could run code when unpickled. "
            "tinyllm loads checkpoints with torch.load(weights_only=True) only, and its own "
            "checkpoints never need more. Use a .ckpt written by tinyllm; for a file you wrote "
            "and trust, re-save just its plain state_dict."
        ) from None
    except Exception as e:
        raise TinyLLMError(_unreadable(path, e)) from None
    verify_checksum(ckpt, path)
    return ckpt


def _unreadable(path: str | Path, e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    why = next((ln for ln in lines if "Unsupported" in ln or "load key" in ln), lines[0])
    return (
        f"Could not read checkpoint '{path}': {type(e).__name__}: {why[:200]}. The file is "
        "truncated, corrupted or not a PyTorch checkpoint; point `ckpt=` at a complete "
        ".ckpt file (checkpoints are written atomically, so last.ckpt of a run is safe)."
    )


# What to suggest when the file named by each option is missing (`ckpt=latest` is generate's).
_MISSING_HINT = {
    "ckpt": ", or `ckpt=latest` for the newest run under outputs/",
    "ckpt_path": ", or `ckpt_path=latest` (or `resume=latest`) to resume the newest run under "
    "outputs/ in its own directory",
}


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict[str, Any]:
    """Load a checkpoint file onto the CPU and check it is a tinyllm checkpoint.

    `option` is the setting that named the file, for the message when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise TinyLLMError(
            f"Checkpoint not found: {option}='{path}'. Pass the path of a .ckpt written by "
            "`python -m tinyllm.train` (e.g. outputs/<date>/<time>/checkpoints/last.ckpt)"
            f"{_MISSING_HINT.get(option, '')}."
        )
    ckpt = load_trusted_types_only(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "model_config" not in hp or "state_dict" not in ckpt:
        raise TinyLLMError(
            f"'{path}' is not a tinyllm checkpoint (no `hyper_parameters.model_config` or "
            "`state_dict` inside). Use a checkpoint written by `python -m tinyllm.train` or "
            "`tinyllm.checkpoint.save_checkpoint`."
        )
    version = hp.get("ckpt_format_version", CKPT_FORMAT_VERSION)
    if version > CKPT_FORMAT_VERSION:
        raise TinyLLMError(
            f"'{path}' has checkpoint format version {version}, newer than this tinyllm "
            f"understands ({CKPT_FORMAT_VERSION}). Upgrade tinyllm (git pull; make install)."
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>"):
    """Build the GPT from a loaded checkpoint dict and load its weights (strict)."""
    from tinyllm.model import GPT, ModelConfig

    hp = ckpt["hyper_parameters"]
    try:
        config = ModelConfig.from_dict(hp["model_config"])
        model = GPT(config)
    except TinyLLMError as e:
        raise TinyLLMError(
            f"Checkpoint '{path}' holds a model config this version cannot build: {e}"
        ) from None
    # (older files written from a compiled model may still carry `_orig_mod.`)
    state = strip_compile_prefix(dict(ckpt["state_dict"]))
    state = {_clean_key(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TinyLLMError(
            f"Checkpoint '{path}' does not match the model its config describes "
            f"(missing keys: {list(missing)[:5]}, unexpected keys: {list(unexpected)[:5]}). "
            "It was written by an incompatible tinyllm version or edited by hand; retrain, "
            "or load it with the tinyllm version that wrote it."
        )
    return model


def tokenizer_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>"):
    from tinyllm.tokenizer import BPETokenizer

    tok = ckpt["hyper_parameters"].get("tokenizer")
    if not tok:
        raise TinyLLMError(
            f"Checkpoint '{path}' carries no tokenizer. It was saved without one (e.g. a "
            "model trained outside `tinyllm.train`); re-save it with "
            "`tinyllm.checkpoint.save_checkpoint(path, model, tokenizer)`."
        )
    return BPETokenizer.from_dict(tok)


def load_checkpoint(path: str | Path, device: Any = "cpu"):
    """`(model, tokenizer)` from a checkpoint alone; the model is in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    tokenizer = tokenizer_from_checkpoint(ckpt, path)
    model.to(device).eval()
    return model, tokenizer


def save_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Any = None, **extra):
    """Write a checkpoint in the same layout as training does, without a Trainer.

    `extra` goes into `hyper_parameters` (plain values only: e.g. `chat_template=...`).
    """
    import lightning

    model = unwrap_compiled(model)
    hp: dict[str, Any] = {
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "ckpt_format_version": CKPT_FORMAT_VERSION,
    }
    hp.update(extra)
    ckpt = {
        "state_dict": {_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": hp,
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
        "epoch": 0,
    }
    torch_save_atomic(add_checksum(ckpt), path)


def resolve_ckpt(spec: str | Path, search_root: str | Path = "outputs") -> Path:
    """Turn `ckpt=` into a file: a .ckpt path, a run directory, or `latest`.

    `latest` is the most recently written `checkpoints/last.ckpt` under `search_root`.
    """
    spec_s = str(spec)
    if spec_s == "latest":
        root = Path(search_root)
        found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise TinyLLMError(
                f"`ckpt=latest` found no checkpoints/last.ckpt under '{root}/'. Train a model "
                "first (`make train` or `python -m tinyllm.train`), or pass `ckpt=PATH`."
            )
        return found[-1]
    p = Path(spec_s)
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        raise TinyLLMError(
            f"'{p}' is a directory without checkpoints/last.ckpt. Pass the .ckpt file itself."
        )
    return p
