"""Shared fixtures: fixed threads and seeds, a tiny real checkpoint, and markers for optional assets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_NO_PROGRESS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama with a locally trained byte-level BPE tokenizer and ChatML template."""
    from memtrain.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _asset_or_skip(name: str) -> str:
    from memtrain import assets

    if not assets.is_present(name):
        pytest.skip(f"embedded asset {name!r} not fetched (run `memtrain assets fetch`)")
    return str(assets.fetch(name))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return _asset_or_skip("smollm2-135m")


@pytest.fixture(scope="session")
def wiki_corpus_path() -> str:
    return _asset_or_skip("wikipedia-vital")


@pytest.fixture(scope="session")
def spacy_model_dir() -> str:
    return _asset_or_skip("spacy-sm")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return _asset_or_skip("minilm")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """SmolLM2 generation with one torch thread: on a busy 2-core box two threads are ~25x slower (their
    OpenMP barriers wait on descheduled threads); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
