"""``memtrain eval longqa`` / ``searchqa`` (the downstream evaluations, paper Tables 1, 2) and ``proxy``.

Settings come from ``--config`` (model/agent/engine/search sections) plus dotted overrides such as
``agent.chunk_tokens=1024``; the flags below override both. Each run writes ``examples.jsonl`` (resumed on
restart), ``summary.json``, ``results.md`` and ``accuracy.png`` into ``--out``.

``eval longqa`` follows MemAgent's RULER-HotpotQA protocol by default: every chunk of every document is read
(``agent.max_chunks`` of the config is a training budget; ``--max-chunks N`` truncates, loudly), sampled at
temperature 0.7 / top-p 0.95 with a fixed seed (``--greedy`` for greedy decoding). ``eval searchqa`` is greedy
by default. ``eval proxy`` scores E2E reconstruction and IMR recall on a proxy set (greedy by default) with
bootstrap 95% intervals; ``memtrain report A B`` then shows the paired difference.
"""

from __future__ import annotations

import argparse
import sys
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on long-document QA, search QA or a proxy set")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    lq = tasks.add_parser("longqa", help="accuracy per document length (RULER-HotpotQA, paper Table 1)",
                          description="Memory agent (default) or the whole document in one prompt "
                          "(--mode full-context, 'too long' where it does not fit).")
    _common(lq)
    lq.add_argument("--mode", choices=["memory", "full-context"], default="memory",
                    help="memory agent (default) or whole document in one prompt")
    lq.add_argument("--max-context", type=int, metavar="TOKENS",
                    help="full-context: the model's context length (default: from its config)")
    # decoding defaults (MemAgent's protocol) live in memtrain.eval.longqa; a flag left out is not passed
    decoding = lq.add_mutually_exclusive_group()
    decoding.add_argument("--temperature", type=float,
                          help="sampling temperature (default 0.7, MemAgent's; 0 = greedy)")
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (= --temperature 0)")
    lq.add_argument("--top-p", type=float, help="nucleus sampling (default 0.95, MemAgent's)")
    lq.add_argument("--seed", type=int, help="sampling seed (default 0, so that runs are reproducible)")
    lq.add_argument("--max-chunks", type=int, metavar="N",
                    help="memory mode: read at most N chunks per document, truncating longer ones (reported "
                    "as a warning); default: every chunk, as MemAgent evaluates (agent.max_chunks is unused)")
    lq.add_argument("--truncation", choices=["centre", "head", "error"],
                    help="with --max-chunks: keep head and tail chunks (default: agent.truncation), the "
                    "first chunks, or fail")
    lq.set_defaults(func=_longqa)
    sq = tasks.add_parser("searchqa", help="EM per data set with the search agent (paper Table 2)")
    _common(sq)
    sq.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sq.add_argument("--seed", type=int, help="sampling seed (with --temperature > 0)")
    sq.add_argument("--retriever", help="URL of `memtrain serve-retriever`, an index directory, or a corpus "
                    "JSONL (BM25 index built once and cached); default search.retriever of the config")
    sq.set_defaults(func=_searchqa)
    px = tasks.add_parser("proxy", help="E2E reconstruction and IMR recall on a proxy set (95%% intervals)",
                          description="One E2E trajectory and one IMR question per document; the IMR "
                          "question is drawn from the data alone with a seed per document, so two models "
                          "get the same questions. Compare runs with `memtrain report A B`.")
    _common(px)
    px.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    px.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0")
    px.add_argument("--seed", type=int, default=0,
                    help="seeds the IMR question draw and sampling (default 0; keep it equal across models)")
    px.set_defaults(func=_proxy)


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


def _print(summary: dict[str, Any], out: Path) -> None:
    from memtrain.eval.report import TABLE

    print((out / TABLE).read_text(encoding="utf-8"))
    print(f"run: {out} (examples.jsonl, summary.json, results.md, accuracy.png)")


def _longqa(args: argparse.Namespace) -> int:
    from memtrain.eval.longqa import run_longqa_eval

    if args.max_chunks is not None:
        print(f"warning: --max-chunks {args.max_chunks}: longer documents are truncated and their unread "
              "parts may hold the answer; MemAgent's protocol reads every chunk", file=sys.stderr)
    decoding = {k: v for k, v in (("temperature", 0.0 if args.greedy else args.temperature),
                                  ("top_p", args.top_p), ("seed", args.seed)) if v is not None}
    summary = run_longqa_eval(build_config(args), args.data, args.out, mode=args.mode, limit=args.limit,
                              batch_size=args.batch_size, max_chunks=args.max_chunks,
                              truncation=args.truncation, max_context=args.max_context, **decoding)
    _print(summary, args.out)
    for warning in summary.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _searchqa(args: argparse.Namespace) -> int:
    from memtrain.eval.searchqa import run_searchqa_eval

    cfg = build_config(args, agent_budgets=False)  # the search agent has its own budgets (search.*)
    summary = run_searchqa_eval(cfg, args.data, args.out, retriever=args.retriever,
                                limit=args.limit, batch_size=args.batch_size, temperature=args.temperature,
                                seed=args.seed)
    _print(summary, args.out)
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from memtrain.eval.proxy import run_proxy_eval

    summary = run_proxy_eval(build_config(args), args.data, args.out, limit=args.limit,
                             batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed)
    _print(summary, args.out)
    return 0
