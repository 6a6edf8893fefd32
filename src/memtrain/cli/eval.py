"""``memtrain eval NAME``: one sub-command per evaluation registered in :mod:`memtrain.eval.registry`.

Built in: ``longqa`` and ``searchqa`` (the downstream evaluations, paper Tables 1, 2) and ``proxy`` (E2E
reconstruction and IMR recall with bootstrap 95% intervals); each module of :mod:`memtrain.eval` documents
its protocol. Settings come from ``--config`` (model/agent/engine/search sections) plus dotted overrides such
as ``agent.chunk_tokens=1024``; the flags override both. Each run writes ``examples.jsonl`` (resumed on
restart), ``summary.json``, ``results.md`` and ``accuracy.png`` into ``--out``; ``memtrain report A B`` puts
runs side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from memtrain.eval.registry import evaluations, get_eval


def _common(p: argparse.ArgumentParser) -> None:
    """The arguments every evaluation has."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--config", type=Path,
                   help="YAML config whose model/agent/engine/search sections are used")
    p.add_argument("--model", help="policy: short name (smollm2-135m), checkpoint dir or HF name "
                   "(default: model.name of the config)")
    p.add_argument("--data", required=True, type=Path, help="set built by `memtrain data ...`")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumed when it exists)")
    p.add_argument("--engine", help="generation engine: hf, vllm, openai or a registered kind (default: "
                   "engine.kind)")
    p.add_argument("--base-url", help="OpenAI-compatible server for --engine openai")
    p.add_argument("--limit", type=int, metavar="N", help="first N examples per group only")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="examples per agent run; results are saved after each (default 16)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark (long-document QA, search QA, proxy)")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for evaluation in evaluations():
        task = tasks.add_parser(evaluation.name, help=evaluation.help, description=evaluation.description)
        _common(task)
        if evaluation.arguments is not None:
            evaluation.arguments(task)
        task.set_defaults(func=_run)


def build_config(args: argparse.Namespace, agent_budgets: bool = True) -> Any:
    """The config with overrides and flags; ``agent_budgets``: without --config, budgets that fit the model
    and device (printed), overrides winning."""
    from memtrain.config import load_config
    from memtrain.io import check_writable

    check_writable(args.out, "--out")  # before any data or model loads
    cfg = load_config(args.config, args.overrides)
    if args.model:
        cfg.model.name = args.model
    if args.engine:
        cfg.engine.kind = args.engine
    if args.base_url:
        cfg.engine.base_url = args.base_url
    if agent_budgets:
        from memtrain.budgets import apply_default_budgets

        print(apply_default_budgets(cfg, args.config), file=sys.stderr, flush=True)
    return cfg


def _run(args: argparse.Namespace) -> int:
    from memtrain.eval.report import TABLE

    evaluation = get_eval(args.task)
    summary = evaluation.command(build_config(args, evaluation.agent_budgets), args)
    print((args.out / TABLE).read_text(encoding="utf-8"))
    print(f"run: {args.out} (examples.jsonl, summary.json, results.md, accuracy.png)")
    for warning in summary.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    return 0
