"""The engine registry: ``engine.kind`` names a builder, found without an if-chain or a closed list.

A builder is ``(cfg: EngineConfig, model_name, model, tokenizer) -> Engine``, registered under its kind with
``@register_engine("kind")``. A built-in engine is one module ``memtrain/engines/<kind>.py`` that registers
itself when imported; it is imported only when a config asks for it, so importing this package (and the CLI
start) stays free of torch, httpx and vllm. Any other module (a plugin, a test file) can register a kind the
same way before the config that names it is validated.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Callable
from typing import Any

from memtrain.engines.base import Engine
from memtrain.errors import UserError

# (cfg: memtrain.config.EngineConfig, model_name, model, tokenizer) -> Engine; this module does not import the
# config (the config's validator imports this module)
Builder = Callable[[Any, str, Any, Any], Engine]

_BUILDERS: dict[str, Builder] = {}
_PACKAGE = "memtrain.engines"
# modules of this package that are not engines
_SUPPORT = frozenset({"base", "checks", "factory", "registry"})
_KIND = re.compile(r"[a-z][a-z0-9_]*")


def register_engine(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder`` makes the engines of ``engine.kind: <kind>``.

    A kind is registered once, and a built-in kind only by its own module: a plugin cannot silently replace
    ``hf``.
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(f"engine kind {kind!r}: expected lower-case letters, digits and '_', "
                         "starting with a letter (e.g. 'my_engine')")

    def decorate(builder: Builder) -> Builder:
        where = f"{builder.__module__}.{builder.__qualname__}"
        home = f"{_PACKAGE}.{kind}"
        old = _BUILDERS.get(kind)
        owner = f"{old.__module__}.{old.__qualname__}" if old is not None else None
        if builder.__module__ != home and _builtin(kind):
            owner = home
        if owner is not None and owner != where:
            raise ValueError(f"engine kind {kind!r} is already registered by {owner}; register {where} "
                             "under another kind")
        _BUILDERS[kind] = builder
        return builder

    return decorate


def _builtin(kind: str) -> bool:
    """Whether ``memtrain/engines/<kind>.py`` exists (looked up, not imported)."""
    return (kind not in _SUPPORT and _KIND.fullmatch(kind) is not None
            and importlib.util.find_spec(f"{_PACKAGE}.{kind}") is not None)


def known_engine_kinds() -> list[str]:
    """Every kind a config may name: the built-in engine modules and whatever has been registered."""
    package = importlib.import_module(_PACKAGE)
    builtins = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    return sorted((builtins - _SUPPORT) | set(_BUILDERS))


def check_engine_kind(kind: str) -> str:
    """``kind`` if an engine of that kind can be built, else a one-line error listing the known kinds."""
    if kind not in _BUILDERS and not _builtin(kind):
        raise UserError(f"unknown engine kind {kind!r}; known kinds: {', '.join(known_engine_kinds())} "
                         "(another module can add one with memtrain.engines.register_engine)")
    return kind


def builder(kind: str) -> Builder:
    """The builder registered for ``kind``, importing its built-in module ``memtrain/engines/<kind>.py`` first
    when needed."""
    kind = check_engine_kind(kind)
    if kind not in _BUILDERS:
        importlib.import_module(f"{_PACKAGE}.{kind}")
        if kind not in _BUILDERS:
            raise ValueError(f"engine kind {kind!r}: {_PACKAGE}.{kind} registers no builder "
                             f"(expected @register_engine({kind!r}) on a function in it)")
    return _BUILDERS[kind]
