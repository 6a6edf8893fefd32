"""``memtrain train --backend verl``: render the verl run from a memtrain config and start verl's trainer.

The run directory holds memtrain's resolved ``config.yaml``, ``verl/`` (the verl dataset, the rendered Hydra
config and the agent-loop file), verl's ``checkpoints/``, ``verl_metrics.jsonl`` and ``tensorboard/``. verl
itself runs as ``python -m verl.trainer.main_ppo --config-path RUN/verl --config-name memtrain_ppo``, on the
local Ray instance it starts, or on the cluster of ``RAY_ADDRESS`` / ``ray job submit`` (docs/verl.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from memtrain.backends.verl import PLUGIN_MODULE
from memtrain.backends.verl.config import RunPaths, compose_verl_config, render_verl_config, write_run_files
from memtrain.backends.verl.data import write_verl_dataset
from memtrain.config import Config, load_config, save_config
from memtrain.errors import UserError
from memtrain.log import logger

CONFIG_FILE = "config.yaml"


def require_verl() -> None:
    """Fail with the install instructions when verl is not importable here."""
    if importlib.util.find_spec("verl") is None:
        raise UserError("--backend verl needs verl, which is not installed in this environment. verl pins "
                        "transformers<5.11, so give it its own environment: python -m venv .venv-verl && "
                        ".venv-verl/bin/pip install -e '.[verl]' plus verl's GPU stack, e.g. "
                        "'verl[vllm]==0.9.1' (docs/verl.md)")


def prepare_run_dir(out_dir: Path, config: Config, resume: bool) -> None:
    """A new run needs a new or empty directory; ``resume`` needs the same config up to resumable keys."""
    from memtrain.rl.checkpoint import config_differences

    holds_run = (out_dir / CONFIG_FILE).is_file()
    if holds_run and not resume:
        raise FileExistsError(f"{out_dir} already holds a training run; pass --resume to continue it, or "
                              "choose another --out")
    if out_dir.is_dir() and not holds_run and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and is not a memtrain run directory (no "
                              f"{CONFIG_FILE}); choose a new or empty --out")
    if holds_run:
        diffs = config_differences(load_config(out_dir / CONFIG_FILE), config)
        if diffs:
            raise UserError(f"cannot resume {out_dir}: the config differs from the run's in "
                            f"{'; '.join(diffs)}")


def verl_command(paths: RunPaths, overrides: Sequence[str]) -> list[str]:
    from memtrain.backends.verl.config import CONFIG_NAME

    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(paths.verl_dir),
            "--config-name", CONFIG_NAME, *overrides]


def run(config: Config, out_dir: str | Path, overrides: Sequence[str] = (), resume: bool = False,
        dry_run: bool = False) -> int:
    """Prepare ``out_dir`` for ``config`` and run verl's trainer there; returns its exit status.

    ``overrides``: extra verl Hydra overrides (after ``config.verl.overrides``). ``dry_run``: write and
    validate everything (verl's own config validation included), but do not start training.
    """
    from memtrain.assets import resolve
    from memtrain.data.dataset import load_rows
    from memtrain.models import load_tokenizer
    from memtrain.rl.tasks.registry import check_rows, make_task

    require_verl()
    if not config.data.path:
        raise UserError("data.path is empty: set it to a dataset directory built by `memtrain data ...`")
    paths = RunPaths(Path(out_dir).resolve())
    prepare_run_dir(paths.out_dir, config, resume)
    rows = load_rows(config.data.path)
    task = make_task(config, load_tokenizer(config.model.name))
    check_rows(task, rows, config.data.path)

    paths.out_dir.mkdir(parents=True, exist_ok=True)
    write_verl_dataset(rows, task.name, paths.train_file)
    rendered = render_verl_config(config, paths, resolve(config.model.name, kind="model"), len(rows), resume)
    write_run_files(config, paths, rendered)
    save_config(config, paths.out_dir / CONFIG_FILE)
    all_overrides = [*config.verl.overrides, *overrides]
    compose_verl_config(paths, all_overrides)
    command = verl_command(paths, all_overrides)
    logger.info("verl run %s: %d rows of %s, config %s", paths.out_dir, len(rows), config.data.path,
                paths.config_file)
    if dry_run:
        print(" ".join(command))
        return 0
    env = dict(os.environ)
    modules = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(dict.fromkeys([*modules, PLUGIN_MODULE]))
    return subprocess.run(command, env=env, check=False).returncode
