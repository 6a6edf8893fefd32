"""Multi-objective search-QA tasks (MEM1 style, docs/method.md section 6): several questions, one episode.

Questions come from the search-QA evaluation layout (``qa-eval/*.json`` of Search-R1 / MEM1): a JSON list of
``{"question": str, "answer": str | [str]}`` (``answers`` / ``golden_answers`` are accepted too, as is JSONL).
A task joins ``objectives`` questions of the SAME data set into one problem; the agent answers all of them in
one box, separated by ';', and the reward is the mean EM over objectives (``memtrain.scoring.score_multi``).
Questions are paired in a seeded order and each is used at most once, so a build is reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from memtrain.data.dataset import read_manifest, write_dataset, write_eval_set
from memtrain.errors import UserError
from memtrain.log import logger

ANSWER_SEP = ";"


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    index: int  # record number in the source file


def dataset_name(path: str | Path) -> str:
    """The data set a file holds, named by its stem (``qa-eval/nq.json`` -> ``nq``)."""
    return Path(path).stem


def _answers(raw: Any) -> tuple[str, ...] | None:
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return None
    out = tuple(str(a).strip() for a in raw if isinstance(a, str | int | float) and str(a).strip())
    return out if len(out) == len(raw) else None


def read_qa(path: str | Path) -> list[QAItem]:
    """Question/answer records of one file.

    A question whose every gold answer contains the objective separator ';' is skipped (with a warning):
    the answer split would cut it in two, so no output could ever match it. Other answers with ';' are
    dropped from that question's gold list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    items: list[QAItem] = []
    skipped: list[int] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i}: expected an object with 'question' and 'answer'")
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}: record {i}: field 'question': expected a non-empty string, "
                            f"got {question!r}")
        key = next((k for k in ("answer", "answers", "golden_answers") if k in rec), None)
        answers = _answers(rec.get(key)) if key else None
        if answers is None:
            raise UserError(f"{path}: record {i}: field 'answer': expected a non-empty string or list of "
                            f"non-empty strings, got {rec.get(key or 'answer')!r}")
        usable = tuple(a for a in answers if ANSWER_SEP not in a)
        if not usable:
            skipped.append(i)
            continue
        items.append(QAItem(" ".join(question.split()), usable, i))
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d question(s) whose answers all contain %r (records %s)", path,
                       len(skipped), ANSWER_SEP, shown)
    if not items:
        raise UserError(f"{path}: no question/answer records")
    return items


def join_questions(questions: Sequence[str]) -> str:
    """The problem text of a task: numbered questions (one question is shown as it is)."""
    if len(questions) == 1:
        return questions[0]
    return "\n".join(f"Question {i}: {q}" for i, q in enumerate(questions, start=1))


def build_tasks(items: Sequence[QAItem], name: str, objectives: int, seed: int,
                num_tasks: int | None = None) -> list[dict[str, Any]]:
    """``num_tasks`` tasks (all complete groups if None) of ``objectives`` distinct questions each."""
    if objectives < 1:
        raise UserError(f"--objectives {objectives}: expected a positive integer")
    order = list(items)
    random.Random(f"{seed}:searchqa:{name}").shuffle(order)
    available = len(order) // objectives
    if num_tasks is not None and num_tasks > available:
        raise UserError(f"{name}: {num_tasks} tasks of {objectives} objectives need "
                        f"{num_tasks * objectives} questions; the file has {len(order)}")
    rows = []
    for t in range(available if num_tasks is None else num_tasks):
        group = order[t * objectives : (t + 1) * objectives]
        questions = [g.question for g in group]
        rows.append({
            "id": f"{name}-{'-'.join(str(g.index) for g in group)}",
            "dataset": name,
            "question": join_questions(questions),
            "questions": questions,
            "answers": [list(g.answers) for g in group],
            "objectives": objectives,
        })
    return rows


def build_searchqa(paths: Sequence[str | Path], objectives: int, seed: int,
                   num_tasks: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Tasks per data set (named by file stem); two files with the same stem are an error."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in paths:
        name = dataset_name(p)
        if name in out:
            raise UserError(f"--qa: two files named {name!r}; data sets are named by file stem")
        out[name] = build_tasks(read_qa(p), name, objectives, seed, num_tasks)
    return out


def mix(tasks: dict[str, list[dict[str, Any]]], seed: int) -> list[dict[str, Any]]:
    """All data sets' tasks in one seeded order (the post-training set mixes e.g. HotpotQA and NQ)."""
    rows = [row for name in sorted(tasks) for row in tasks[name]]
    random.Random(f"{seed}:searchqa:mix").shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------- writing

INDEX_FILE = "searchqa.json"
SCHEMA = pa.schema([("id", pa.string()), ("dataset", pa.string()), ("question", pa.string()),
                    ("questions", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
                    ("objective_answers", pa.list_(pa.list_(pa.string()))), ("objectives", pa.int32())])


def to_row(task: Mapping[str, Any]) -> dict[str, Any]:
    """A task as a dataset row. ``answers`` (the column every dataset has) is the canonical combined answer
    (first gold of each objective, joined by '; '); scoring uses ``objective_answers``."""
    golds = task["answers"]
    combined = list(golds[0]) if len(golds) == 1 else [f"{ANSWER_SEP} ".join(g[0] for g in golds)]
    return {"id": task["id"], "dataset": task["dataset"], "question": task["question"],
            "questions": task["questions"], "answers": combined, "objective_answers": golds,
            "objectives": task["objectives"]}


def write_searchqa(out: str | Path, tasks: Mapping[str, list[dict[str, Any]]], info: Mapping[str, Any],
                   train: bool = False, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """``train`` -> one dataset in ``out`` mixing all data sets; else one dataset per data set in
    ``out/NAME`` plus ``out/searchqa.json``. All or nothing."""
    out = Path(out)
    if train:
        return write_dataset(out, (to_row(t) for t in mix(dict(tasks), seed)), SCHEMA, "searchqa",
                             info={**info, "datasets": {k: len(v) for k, v in tasks.items()}},
                             overwrite=overwrite)
    index = {"task": "searchqa", "datasets": {name: len(rows) for name, rows in tasks.items()},
             "dirs": {name: name for name in tasks}, **info}
    parts = {name: ((to_row(t) for t in rows), {**info, "dataset": name}) for name, rows in tasks.items()}
    return write_eval_set(out, INDEX_FILE, parts, SCHEMA, "searchqa", index, overwrite)


def eval_sets(data_dir: str | Path) -> list[tuple[str, Path]]:
    """(data set name, dataset dir) of a built searchqa eval set; a single dataset dir is one data set."""
    data_dir = Path(data_dir)
    index = data_dir / INDEX_FILE
    if index.is_file():
        meta = json.loads(index.read_text(encoding="utf-8"))
        return [(name, data_dir / d) for name, d in meta["dirs"].items()]
    manifest = read_manifest(data_dir)
    if manifest.get("task") != "searchqa":
        raise UserError(f"{data_dir}: neither a searchqa eval set ({INDEX_FILE}) nor a searchqa dataset "
                        "(build one with `memtrain data searchqa`)")
    return [(str(manifest.get("dataset") or data_dir.name), data_dir)]
