"""``memtrain eval longqa`` and ``memtrain eval searchqa``: the downstream evaluations (paper Tables 1, 2).

Settings come from ``--config`` (model/agent/engine/search sections) plus dotted overrides such as
``agent.chunk_tokens=1024``; the flags below override both. Each run writes ``examples.jsonl`` (resumed on
restart), ``summary.json``, ``results.md`` and ``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--config", type=Path,
                   help="YAML config whose model/agent/engine/search sections are used")
    p.add_argument("--model", help="policy: short name (smollm2-135m), checkpoint dir or HF name "
                   "(default: model.name of the config)")
    p.add_argument("--data", required=True, type=Path, help="set built by `memtrain data ...`")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumed when it exists)")
    p.add_argument("--engine", choices=["hf", "openai"], help="generation engine (default: engine.kind)")
    p.add_argument("--base-url", help="OpenAI-compatible server for --engine openai")
    p.add_argument("--limit", type=int, metavar="N", help="first N examples per group only")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="examples per agent run; results are saved after each (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature > 0)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on long-document QA or search QA")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    lq = tasks.add_parser("longqa", help="accuracy per document length (RULER-HotpotQA, paper Table 1)",
                          description="Memory agent (default) or the whole document in one prompt "
                          "(--mode full-context, 'too long' where it does not fit).")
    _common(lq)
    lq.add_argument("--mode", choices=["memory", "full-context"], default="memory",
                    help="memory agent (default) or whole document in one prompt")
    lq.add_argument("--max-context", type=int, metavar="TOKENS",
                    help="full-context: the model's context length (default: from its config)")
    lq.set_defaults(func=_longqa)
    sq = tasks.add_parser("searchqa", help="EM per data set with the search agent (paper Table 2)")
    _common(sq)
    sq.add_argument("--retriever", help="URL of `memtrain serve-retriever`, an index directory, or a corpus "
                    "JSONL (BM25 index built once and cached); default search.retriever of the config")
    sq.set_defaults(func=_searchqa)


def build_config(args: argparse.Namespace) -> Any:
    from memtrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.model:
        cfg.model.name = args.model
    if args.engine:
        cfg.engine.kind = args.engine
    if args.base_url:
        cfg.engine.base_url = args.base_url
    return cfg


def _print(summary: dict[str, Any], out: Path) -> None:
    from memtrain.eval.report import TABLE

    print((out / TABLE).read_text(encoding="utf-8"))
    print(f"run: {out} (examples.jsonl, summary.json, results.md, accuracy.png)")


def _longqa(args: argparse.Namespace) -> int:
    from memtrain.eval.longqa import run_longqa_eval

    summary = run_longqa_eval(build_config(args), args.data, args.out, mode=args.mode, limit=args.limit,
                              batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                              max_context=args.max_context)
    _print(summary, args.out)
    return 0


def _searchqa(args: argparse.Namespace) -> int:
    from memtrain.eval.searchqa import run_searchqa_eval

    summary = run_searchqa_eval(build_config(args), args.data, args.out, retriever=args.retriever,
                                limit=args.limit, batch_size=args.batch_size, temperature=args.temperature,
                                seed=args.seed)
    _print(summary, args.out)
    return 0
