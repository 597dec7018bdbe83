"""tinyllm: train small GPT-style language models from scratch, and do research with them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinyllm.errors import TinyLLMError

__version__ = "0.1.0"
__all__ = ["TinyLLMError", "load_checkpoint", "__version__"]

if TYPE_CHECKING:
    from tinyllm.model import GPT
    from tinyllm.tokenizer import BPETokenizer


def load_checkpoint(path: str, device: Any = "cpu") -> tuple[GPT, BPETokenizer]:
    """Rebuild `(model, tokenizer)` from a tinyllm checkpoint alone (model in eval mode)."""
    from tinyllm.checkpoint import load_checkpoint as _load

    return _load(path, device=device)
