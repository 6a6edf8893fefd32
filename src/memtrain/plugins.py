"""Plug-ins for the ``memtrain`` command: ``MEMTRAIN_PLUGINS`` lists modules to import before the command
line is parsed (comma-separated: dotted module names on the Python path, or paths to ``.py`` files).

A plug-in registers what it defines when it is imported (``@register_task``, ``@register_reward``,
``@register_eval``, ``@register_engine``, ``register_prompt``), so ``memtrain train`` and ``memtrain eval
NAME`` see it with no edit to memtrain; torchrun ranks and verl workers inherit the variable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from memtrain.errors import UserError

PLUGINS_ENV = "MEMTRAIN_PLUGINS"


def _load(spec: str) -> ModuleType:
    if not spec.endswith(".py"):
        return importlib.import_module(spec)
    path = Path(spec).resolve()
    name = f"memtrain_plugin_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {spec}")
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"not a Python module: {spec}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    return module


def load_plugins(value: str | None = None) -> list[ModuleType]:
    """Import every plug-in ``value`` (default ``$MEMTRAIN_PLUGINS``) lists; one that fails to import is a
    one-line error naming it and why."""
    value = os.environ.get(PLUGINS_ENV, "") if value is None else value
    modules = []
    for spec in (s.strip() for s in value.split(",")):
        if not spec:
            continue
        try:
            modules.append(_load(spec))
        except Exception as exc:  # any failure of the plug-in's own code is the plug-in's to fix
            raise UserError(f"{PLUGINS_ENV}: cannot import {spec!r}: {type(exc).__name__}: {exc}") from exc
    return modules
