"""The training tasks (``train.task``): one module per task, each registering its class with
``@register_task("name")`` (:mod:`memtrain.rl.tasks.registry`).

Every module of this package is imported here, so a new built-in task is one new file. A task defined
elsewhere (a test, a user's module) registers itself the same way when its module is imported.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
