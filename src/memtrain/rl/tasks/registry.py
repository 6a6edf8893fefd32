"""Tasks by name: ``@register_task("name")`` makes a :class:`~memtrain.rl.rollout.Task` selectable as
``train.task: name``; :func:`make_task` builds the one a config names.

A task owns its settings: ``@register_task("name", settings=Model)`` (a pydantic model) validates the
config's ``task:`` section when the task is built, so a task's options live in its own file instead of the
global sections, and an unknown key or a bad value is a one-line error that names it.

Importing this module imports the :mod:`memtrain.rl.tasks` package first, which imports every built-in task
module, so the registry below is complete for the built-in tasks by the time anything looks a name up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from memtrain.config import Config
from memtrain.errors import UserError
from memtrain.rl.rollout import Task

T = TypeVar("T", bound=type)

TASKS: dict[str, type[Task]] = {}


def register_task(name: str, settings: type[BaseModel] | None = None) -> Callable[[T], T]:
    """Class decorator: register the task class under ``name`` (also its ``name`` attribute), with the model
    of its ``task:`` config section (``settings``; none: the task takes no settings of its own).

    A name is registered once, so a plug-in cannot silently replace a built-in task.
    """

    def register(cls: T) -> T:
        if name in TASKS:
            known = TASKS[name]
            raise ValueError(f"task {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        cls.name = name  # type: ignore[attr-defined]
        cls.settings_model = settings  # type: ignore[attr-defined]
        TASKS[name] = cls  # type: ignore[assignment]
        return cls

    return register


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name``; a one-line error listing the registered ones otherwise."""
    cls = TASKS.get(name)
    if cls is None:
        raise UserError(f"train.task {name!r} has no registered task (registered: "
                        f"{', '.join(sorted(TASKS))}); a task registers itself with @register_task "
                        "(memtrain.rl.tasks.registry) when its module is imported")
    return cls


def task_settings(config: Config) -> BaseModel | None:
    """``config.task`` validated by the model ``train.task`` registered (None for a task without one)."""
    name = config.train.task
    model: type[BaseModel] | None = getattr(task_class(name), "settings_model", None)
    section = dict(config.task)
    if model is None:
        if section:
            raise UserError(f"task.{next(iter(section))}: train.task {name!r} takes no settings of its own "
                            "(the task: section is for a task registered with settings=...)")
        return None
    known = list(model.model_fields)
    unknown = [k for k in section if k not in known]
    if unknown:
        raise UserError(f"task.{unknown[0]}: unknown setting of train.task {name!r} (known: "
                        f"{', '.join(known) or 'none'})")
    try:
        return model.model_validate(section)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"task.{where}: {err['msg']} (got {err.get('input')!r}; train.task {name!r})"
                        ) from None


def make_task(config: Config, tokenizer: Any) -> Task:
    """The task ``config.train.task`` names, built for ``tokenizer``, with its ``settings`` validated
    first (a task's ``__init__`` may call :func:`task_settings` itself)."""
    settings = task_settings(config)
    task = task_class(config.train.task)(config, tokenizer)
    task.settings = settings  # type: ignore[attr-defined]
    return task


def check_rows(task: Task, rows: list[dict], source: str) -> None:
    """Fail before any model is loaded when the dataset lacks a field the task reads."""
    if not rows:
        raise UserError(f"{source}: the dataset has no rows")
    for i, row in enumerate(rows):
        missing = [f for f in task.required_fields if f not in row or row[f] is None]
        if missing:
            raise UserError(
                f"{source}: row {i} (id {row.get('id')!r}) lacks {', '.join(missing)}, which "
                f"train.task={task.name!r} needs (fields: {', '.join(task.required_fields)}); "
                "was the dataset built for another task?"
            )
