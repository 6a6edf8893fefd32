"""Generation engines behind one interface: local transformers, OpenAI-compatible servers, scripted.

``HFEngine``, ``OpenAIEngine``, ``EngineError`` and ``make_engine`` are imported lazily, so that importing
this package (e.g. at CLI start) does not import torch or httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

from memtrain.engines.base import Completion, Engine, GenerationRequest, SamplingParams

_LAZY = {
    "HFEngine": "memtrain.engines.hf",
    "OpenAIEngine": "memtrain.engines.openai",
    "EngineError": "memtrain.engines.openai",
    "make_engine": "memtrain.engines.factory",
}

__all__ = ["Completion", "Engine", "EngineError", "GenerationRequest", "HFEngine", "OpenAIEngine",
           "SamplingParams", "make_engine"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memtrain.engines' has no attribute {name!r}")
