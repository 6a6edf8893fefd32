"""The evaluations (benchmarks) of ``memtrain eval``, each registered by the one module that implements it.

An evaluation module of :mod:`memtrain.eval` decorates its command with :func:`register_eval`, which gives
the sub-command's help, its own arguments and the metric its reports lead with. ``memtrain eval NAME`` is
built from this registry and ``memtrain report`` takes its default metric from it, so a new file in
``memtrain/eval`` is a new benchmark with no edit elsewhere.

Every module of the package is imported when the ``memtrain`` parser is built (:func:`evaluations`), so
their top-level imports must stay light: torch, numpy, pyarrow and the like go inside the functions that
use them, and ``memtrain --help`` stays fast.

A command receives the config (``--config``, dotted overrides, ``--model`` / ``--engine`` / ``--base-url``)
and the parsed arguments, including the shared ones every evaluation has (``--data``, ``--out``,
``--limit``, ``--batch-size``); it writes its run directory (``results.md`` among the files of
:mod:`memtrain.eval.report`) and returns the summary. An evaluation may also give a ``validate`` function
(:data:`Validator`): then ``memtrain train`` with ``train.task`` of the same name can evaluate the policy
as it trains (``train.eval_data``), on the training engine, into the same kind of run directory.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memtrain.errors import UserError
from memtrain.scoring import METRICS

if TYPE_CHECKING:
    from memtrain.config import Config

Command = Callable[["Config", argparse.Namespace], Mapping[str, Any]]
Arguments = Callable[[argparse.ArgumentParser], None]
# validate(cfg, data_dir, out_dir, *, limit, batch_size, engine, tokenizer, model_id) -> summary: greedy, with
# the engine given (the trainer's, synced to the policy); model_id names what is evaluated in the resume check
Validator = Callable[..., Mapping[str, Any]]


@dataclass(frozen=True)
class Evaluation:
    """One ``memtrain eval NAME`` sub-command.

    ``agent_budgets``: without ``--config``, set the memory agent's budgets for the model and device
    (:func:`memtrain.budgets.apply_default_budgets`); an evaluation with budgets of its own sets it False.
    """

    name: str
    help: str
    main_metric: str
    command: Command
    arguments: Arguments | None = None
    description: str | None = None
    agent_budgets: bool = True
    validate: Validator | None = None


_REGISTRY: dict[str, Evaluation] = {}


def register_eval(name: str, *, help: str, main_metric: str, arguments: Arguments | None = None,
                  description: str | None = None, agent_budgets: bool = True,
                  validate: Validator | None = None) -> Callable[[Command], Command]:
    """Register the decorated command as ``memtrain eval NAME`` (see :class:`Evaluation`)."""

    def decorator(command: Command) -> Command:
        if name in _REGISTRY:
            raise ValueError(f"evaluation {name!r} is registered twice")
        if main_metric not in METRICS:
            raise ValueError(f"evaluation {name!r}: main_metric {main_metric!r} is not one of "
                             f"{', '.join(METRICS)}")
        _REGISTRY[name] = Evaluation(name, help, main_metric, command, arguments, description, agent_budgets,
                                     validate)
        return command

    return decorator


@functools.cache
def _import_builtin() -> None:
    """Import every module of :mod:`memtrain.eval`: those that are evaluations register themselves."""
    import memtrain.eval as package

    for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        importlib.import_module(module.name)


def evaluations() -> list[Evaluation]:
    """Every registered evaluation, by name (the built-in ones and any registered before the call)."""
    _import_builtin()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_eval(name: str) -> Evaluation:
    """The evaluation registered as ``name``; a summary of an unknown one is the user's to fix."""
    _import_builtin()
    if name not in _REGISTRY:
        raise UserError(f"no evaluation named {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
