"""Build the generation engine a config asks for (the ``engine`` section), without importing torch for
the ``openai`` kind."""

from __future__ import annotations

from typing import Any

from memtrain.config import EngineConfig
from memtrain.engines.base import Engine
from memtrain.log import logger


def make_engine(cfg: EngineConfig, model_name: str, model: Any = None, tokenizer: Any = None) -> Engine:
    """An ``hf`` or ``openai`` engine for the policy ``model_name`` (``model.name`` in the config).

    ``hf``: wraps ``model`` (the trainer passes the very model it updates) or loads ``model_name``.
    ``openai``: talks to ``cfg.base_url`` serving ``cfg.served_model`` (default ``model_name``); the tokenizer
    of ``model_name`` (loaded when not given) lets it send prompts as token ids.
    """
    if cfg.kind == "hf":
        from memtrain.engines.hf import HFEngine
        from memtrain.models import load_policy, load_tokenizer

        if tokenizer is None:
            tokenizer = load_tokenizer(model_name)
        if model is None:
            model = load_policy(model_name)
        return HFEngine(model, tokenizer, batch_size=cfg.batch_size, prefill_tokens=cfg.prefill_tokens)
    if cfg.kind == "openai":
        from memtrain.engines.openai import OpenAIEngine

        if not cfg.base_url:
            raise ValueError("engine.base_url: required when engine.kind is 'openai' "
                             "(e.g. engine.base_url=http://localhost:8000/v1)")
        if tokenizer is None:
            tokenizer = _tokenizer_or_none(model_name)
        return OpenAIEngine(cfg.base_url, cfg.served_model or model_name, api_key_env=cfg.api_key_env,
                            max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s,
                            max_retries=cfg.max_retries, tokenizer=tokenizer, vllm_extras=cfg.vllm_extras)
    if cfg.kind == "scripted":
        raise ValueError("engine.kind 'scripted': a scripted engine replays fixed outputs for tests and "
                         "demos and must be constructed in code (memtrain.engines.scripted), not from a "
                         "config; use engine.kind=hf or engine.kind=openai")
    raise ValueError(f"engine.kind {cfg.kind!r}: expected 'hf' or 'openai'")


def _tokenizer_or_none(model_name: str) -> Any:
    """The policy's tokenizer when it can be loaded locally; the server's text is used otherwise."""
    from memtrain.assets import AssetError
    from memtrain.models import load_tokenizer

    try:
        return load_tokenizer(model_name)
    except (AssetError, OSError, ValueError) as exc:
        logger.warning("openai engine: no tokenizer for %r (%s); sending prompt text, token ids come "
                       "from the server", model_name, exc)
        return None
