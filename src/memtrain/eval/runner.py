"""The loop every evaluation shares: resume check, fixed batches, records appended as each batch finishes,
progress, and the summary over exactly the rows asked for.

An evaluation supplies only what is its own (``EvalRun``): its rows in named groups (document sizes, data
sets), the key of a row's record, how to start evaluating (load the engine, build the agent: only when
something is left to do) and how a batch of rows becomes records, and how the records become a summary and a
report. Batches are cut from ALL rows of a group, not from the rows left: a resumed run evaluates the same
batches an uninterrupted one does, so a sampled evaluation (seeded per batch) gives the same records either
way. A batch whose rows are all recorded is skipped; records of rows already recorded are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrain.config import Config
from memtrain.engines.base import Engine
from memtrain.eval.report import EXAMPLES, check_resume, done_keys
from memtrain.io import append_jsonl, read_jsonl, release_dir_lock
from memtrain.log import logger
from memtrain.progress import Progress

Row = Mapping[str, Any]
Record = dict[str, Any]
# evaluate(group, batch_index, rows, progress) -> one record per row, each with its "key"
BatchFn = Callable[[str, int, list[Row], Progress], list[Record]]


def load_engine(cfg: Config, engine: Engine | None = None, tokenizer: Any = None) -> tuple[Engine, Any]:
    """The policy's tokenizer and the engine ``cfg.engine`` asks for (given ones are used as they are)."""
    from memtrain.models import load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.name)
    if engine is None:
        from memtrain.engines.factory import make_engine

        model = None
        if cfg.engine.kind == "hf":
            from memtrain.models import load_policy

            device = None if cfg.model.device == "auto" else cfg.model.device
            model = load_policy(cfg.model.name, cfg.model.dtype, device,
                                inference_compute_dtype=cfg.model.compute_dtype)
            model.eval()
        engine = make_engine(cfg.engine, cfg.model.name, model=model, tokenizer=tokenizer)
    return engine, tokenizer


def group_key(group: str, row: Row) -> str:
    """The default record key: ``group/id`` (the same id may appear in several groups)."""
    return f"{group}/{row['id']}"


@dataclass
class Evaluator:
    """What ``EvalRun.start`` returns: the batch function, and what to log once every batch is done."""

    batch: BatchFn
    finish: Callable[[], None] = field(default=lambda: None)


@dataclass
class EvalRun:
    """One evaluation run. ``meta`` is what ``eval.json`` records (a resume must match it); ``turns``
    estimates a row's agent turns for the progress line; ``summarize`` writes the report files and returns
    the summary."""

    name: str
    out: Path
    meta: Mapping[str, Any]
    groups: Mapping[str, Sequence[Row]]
    batch_size: int
    start: Callable[[], Evaluator]
    summarize: Callable[[list[Record]], dict[str, Any]]
    key: Callable[[str, Row], str] = group_key
    turns: Callable[[Row], int] = field(default=lambda row: 1)


def run_eval(run: EvalRun) -> dict[str, Any]:
    """Evaluate what ``run.out`` does not hold yet, then summarize every row of ``run.groups``."""
    out = Path(run.out)
    check_resume(out, run.meta)
    done = done_keys(out)
    batches = [(group, b, list(rows[i : i + run.batch_size]))
               for group, rows in run.groups.items()
               for b, i in enumerate(range(0, len(rows), run.batch_size))]
    todo = [(g, b, rows) for g, b, rows in batches if any(run.key(g, r) not in done for r in rows)]
    if todo:
        evaluator = run.start()
        pending = [r for g, _, rows in todo for r in rows if run.key(g, r) not in done]
        progress = Progress(run.name, len(pending), sum(run.turns(r) for r in pending))
        for n, (group, b, rows) in enumerate(todo, 1):
            records = [r for r in evaluator.batch(group, b, rows, progress) if r["key"] not in done]
            append_jsonl(out / EXAMPLES, records)
            done.update(r["key"] for r in records)
            logger.info("%s: batch %d/%d done (%s%d rows)", run.name, n, len(todo),
                        f"{group}: " if group else "", len(rows))
        progress.finish()
        evaluator.finish()
    by_key = {r["key"]: r for r in read_jsonl(out / EXAMPLES)} if (out / EXAMPLES).is_file() else {}
    summary = run.summarize([by_key[run.key(g, r)] for g, rows in run.groups.items() for r in rows])
    release_dir_lock(out)  # taken by check_resume: the run is complete
    return summary
