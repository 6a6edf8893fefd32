"""A new benchmark in one file: closed-book QA (the question alone, no document) over a JSONL set,
resumable and reported through the shared runner (tests/test_eval_runner.py runs it as ``memtrain eval
closedbook``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memtrain.config import Config
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.eval.registry import register_eval
from memtrain.eval.report import summarize, write_report
from memtrain.eval.runner import EvalRun, Evaluator, Row, load_engine, run_eval
from memtrain.io import read_jsonl
from memtrain.progress import Progress
from memtrain.prompts import render
from memtrain.scoring import score


@register_eval("closedbook", help="EM of answers to the question alone, per set", main_metric="em",
               agent_budgets=False)
def closedbook_command(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    rows = read_jsonl(args.data)
    groups = {s: [r for r in rows if r["set"] == s][: args.limit] for s in sorted({r["set"] for r in rows})}
    out = Path(args.out)
    meta = {"task": "closedbook", "model": cfg.model.name, "data": str(Path(args.data).resolve()),
            "engine": cfg.engine.kind, "answer_tokens": cfg.agent.answer_tokens}

    def start() -> Evaluator:
        engine, tok = load_engine(cfg)

        def batch(group: str, b: int, rows: list[Row], progress: Progress) -> list[dict[str, Any]]:
            prompts = [render(tok, "closed_book", cfg.agent.templates, problem=r["question"]) for r in rows]
            params = SamplingParams(temperature=0.0, max_tokens=cfg.agent.answer_tokens)
            outputs = engine.generate([GenerationRequest(ids, params, text) for text, ids in prompts])
            progress.add(docs=len(rows), turns=len(rows))
            return [{"key": f"{group}/{r['id']}", "group": group, "status": "ok", "prediction": o[0].text,
                     "metrics": score(o[0].text, r["answers"])} for r, o in zip(rows, outputs, strict=True)]

        return Evaluator(batch)

    def report(records: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize(records, "closedbook", list(groups), meta)
        write_report(out, summary)
        return summary

    return run_eval(EvalRun("closedbook eval", out, meta, groups, args.batch_size, start, report))
