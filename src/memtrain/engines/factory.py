"""Build the engine a config names (``engine.kind``) with the builder registered for it
(:mod:`memtrain.engines.registry`)."""

from __future__ import annotations

from typing import Any

from memtrain.config import EngineConfig
from memtrain.engines.base import Engine
from memtrain.engines.registry import builder


def make_engine(cfg: EngineConfig, model_name: str, model: Any = None, tokenizer: Any = None) -> Engine:
    """The engine ``cfg.kind`` names, for the policy ``model_name`` (``model.name`` in the config).

    ``model``: the policy object when the caller has one (the trainer passes the very model it updates, which
    an in-process engine must sample from); ``tokenizer``: its tokenizer, loaded by the engine when None.
    """
    return builder(cfg.kind)(cfg, model_name, model, tokenizer)
