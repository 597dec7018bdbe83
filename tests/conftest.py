"""Shared fixtures. Tests read the shared corpora from ../shared/data and skip when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TINYLLM_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests are many small CPU jobs: one thread each avoids oversubscribing the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding tinyshakespeare.txt, gutenberg_pd14.txt and gpt2.tiktoken."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text corpus (train_utils.write_corpus) for real training runs, one per module;
    a module that needs another corpus defines its own `corpus` fixture."""
    from train_utils import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a module's runs prepare their data (shared, so it is prepared once)."""
    return tmp_path_factory.mktemp("data")
