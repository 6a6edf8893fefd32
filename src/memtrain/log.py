"""Logging and progress: quiet in CI and pipes, progress bars on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from memtrain.errors import UserError

T = TypeVar("T")
logger = logging.getLogger("memtrain")


def setup_logging(level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UserError(f"--log-level {level!r}: expected one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logger.setLevel(numeric)
    if not progress_enabled():
        # transformers/huggingface_hub read this when first imported: no weight-loading bars in CI logs.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress_enabled() -> bool:
    """Bars only for a person at a terminal: never in CI, never when stderr is a file or pipe."""
    if os.environ.get("CI") or os.environ.get("MEMTRAIN_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=not progress_enabled(), leave=False))


def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    return tqdm(desc=desc, total=total, unit=unit, disable=not progress_enabled(), leave=False)
