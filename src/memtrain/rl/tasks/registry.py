"""Tasks by name: ``@register_task("name")`` makes a :class:`~memtrain.rl.rollout.Task` selectable as
``train.task: name``; :func:`make_task` builds the one a config names.

Importing this module imports the :mod:`memtrain.rl.tasks` package first, which imports every built-in task
module, so the registry below is complete for the built-in tasks by the time anything looks a name up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from memtrain.config import Config
from memtrain.errors import UserError
from memtrain.rl.rollout import Task

T = TypeVar("T", bound=type)

TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register the task class under ``name`` (also its ``name`` attribute).

    A name is registered once, so a plug-in cannot silently replace a built-in task.
    """

    def register(cls: T) -> T:
        if name in TASKS:
            known = TASKS[name]
            raise ValueError(f"task {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        cls.name = name  # type: ignore[attr-defined]
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


def make_task(config: Config, tokenizer: Any) -> Task:
    """The task ``config.train.task`` names, built for ``tokenizer``."""
    return task_class(config.train.task)(config, tokenizer)


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
