"""Generation engines behind one interface: local transformers, in-process vLLM, OpenAI-compatible servers,
scripted; ``engine.kind`` picks one by name (``register_engine`` adds kinds, see ``registry``).

``HFEngine``, ``VLLMEngine``, ``OpenAIEngine``, ``EngineError``, ``make_engine`` and ``register_engine`` are
imported lazily, so that importing this package (e.g. at CLI start) does not import torch, httpx or vllm.
"""

from __future__ import annotations

import importlib
from typing import Any

from memtrain.engines.base import Completion, Engine, GenerationRequest, SamplingParams

_LAZY = {
    "HFEngine": "memtrain.engines.hf",
    "VLLMEngine": "memtrain.engines.vllm",
    "OpenAIEngine": "memtrain.engines.openai",
    "EngineError": "memtrain.engines.openai",
    "make_engine": "memtrain.engines.factory",
    "register_engine": "memtrain.engines.registry",
}

__all__ = ["Completion", "Engine", "EngineError", "GenerationRequest", "HFEngine", "OpenAIEngine",
           "SamplingParams", "VLLMEngine", "make_engine", "register_engine"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memtrain.engines' has no attribute {name!r}")
