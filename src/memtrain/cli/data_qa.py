"""``memtrain data longqa`` and ``memtrain data searchqa``: the downstream QA sets
(docs/method.md sections 5-6).

Registered into the shared ``data`` group (:func:`memtrain.cli.data.data_commands`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from memtrain.cli.data import data_commands
from memtrain.errors import UserError
from memtrain.io import check_writable


def _files(spec: str, flag: str) -> list[Path]:
    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if not paths:
        raise UserError(f"{flag} {spec!r}: expected one or more comma-separated files")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{flag}: {p} does not exist")
    return paths


@data_commands
def longqa_and_searchqa(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "longqa", help="build long-document HotpotQA sets (RULER-HotpotQA style) for eval or post-training",
        description="Per question: its gold paragraphs + distractor paragraphs from all other questions, "
        "shuffled, as 'Document i:' blocks; the same questions at every --num-docs size.")
    p.add_argument("--hotpotqa", required=True, metavar="FILE[,FILE]",
                   help="HotpotQA questions: official JSON or Hugging Face hotpot_qa JSONL/JSON/parquet")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--num-docs", default="50,100,200,400,800,1600,3200,6400", metavar="N[,N...]",
                   help="paragraphs per document, one set per size (default the paper's 50..6400; --train: "
                   "one size, e.g. 200)")
    p.add_argument("--num-questions", type=int, metavar="Q",
                   help="questions per size (default 128; --train: all)")
    p.add_argument("--seed", type=int, default=42, help="selects questions and distractors (default 42)")
    p.add_argument("--train", action="store_true", help="build one post-training dataset (one size) in --out")
    p.add_argument("--pool", metavar="FILE[,FILE]",
                   help="extra HotpotQA files whose paragraphs join the distractor pool (answers not needed)")
    p.add_argument("--own-distractors", action="store_true",
                   help="also keep each question's own 8 HotpotQA distractor paragraphs (RULER's variant)")
    p.add_argument("--filter-model", metavar="MODEL",
                   help="drop questions this model answers (normalised EM) without any context; cached")
    p.add_argument("--filter-engine", choices=["hf", "openai"], default="hf", help="engine of --filter-model")
    p.add_argument("--filter-base-url", metavar="URL", help="server of --filter-engine openai")
    p.add_argument("--filter-cache", metavar="FILE",
                   help="closed-book answers cache (default under $MEMTRAIN_HOME/cache)")
    p.add_argument("--tokenizer", metavar="MODEL", help="also record each document's token count")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
    p.set_defaults(func=_longqa)

    s = verbs.add_parser(
        "searchqa", help="build multi-objective search-QA tasks (MEM1 style) for eval or post-training",
        description="Joins --objectives questions of the same data set into one task; the agent answers "
        "all of them, separated by ';'. Data sets are named by file stem.")
    s.add_argument("--qa", required=True, metavar="FILE[,FILE]",
                   help="JSON list (or JSONL) of {question, answer: str | [str]}, e.g. qa-eval/nq.json")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory")
    s.add_argument("--objectives", type=int, default=2, help="questions per task (default 2)")
    s.add_argument("--num-tasks", type=int, metavar="N", help="tasks per data set (default: all)")
    s.add_argument("--seed", type=int, default=42, help="pairs the questions (default 42)")
    s.add_argument("--train", action="store_true", help="one post-training dataset mixing all files")
    s.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
    s.set_defaults(func=_searchqa)


def _longqa(args: argparse.Namespace) -> int:
    from memtrain.data.longqa import (
        build_longqa,
        closed_book_filter,
        paragraph_pool,
        parse_sizes,
        read_hotpotqa,
        write_longqa,
    )

    start = time.time()
    check_writable(Path(args.out).parent, f"--out {args.out}: directory")  # before hours of building
    sizes = parse_sizes(args.num_docs)
    if args.train and len(sizes) != 1:
        raise UserError(f"--train builds one document size; got --num-docs {args.num_docs} (e.g. use 200)")
    if args.num_questions is not None and args.num_questions < 1:
        raise UserError(f"--num-questions {args.num_questions}: expected a positive integer")
    num_questions = args.num_questions if args.num_questions is not None else (None if args.train else 128)
    question_files = _files(args.hotpotqa, "--hotpotqa")
    examples = read_hotpotqa(question_files)
    pool = paragraph_pool(examples)
    pool_files = _files(args.pool, "--pool") if args.pool else []
    if pool_files:
        pool = list(dict.fromkeys(pool + paragraph_pool(read_hotpotqa(pool_files, require_answer=False))))
    drop = None
    tokenizer = None
    if args.tokenizer:
        from memtrain.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.filter_model:
        from memtrain.config import EngineConfig
        from memtrain.engines.factory import make_engine
        from memtrain.models import load_tokenizer

        filter_tok = load_tokenizer(args.filter_model)
        engine = make_engine(EngineConfig(kind=args.filter_engine, base_url=args.filter_base_url),
                             args.filter_model, tokenizer=filter_tok)
        drop = closed_book_filter(engine, filter_tok, args.filter_model, args.filter_cache)
    rows = build_longqa(examples, sizes, num_questions, args.seed, pool=pool,
                        own_distractors=args.own_distractors, drop=drop)
    info = {"params": {"hotpotqa": [str(p) for p in question_files], "pool": [str(p) for p in pool_files],
                       "num_questions": len(next(iter(rows.values()))), "seed": args.seed,
                       "own_distractors": args.own_distractors, "filter_model": args.filter_model},
            "pool_paragraphs": len(pool)}
    write_longqa(args.out, rows, info, train=args.train, tokenizer=tokenizer, overwrite=args.overwrite)
    n = len(next(iter(rows.values())))
    print(f"wrote {n} questions x {len(sizes)} size(s) ({', '.join(map(str, sizes))} paragraphs) to "
          f"{args.out} in {time.time() - start:.1f}s (pool {len(pool)} paragraphs)")
    return 0


def _searchqa(args: argparse.Namespace) -> int:
    from memtrain.data.searchqa import build_searchqa, write_searchqa

    if args.num_tasks is not None and args.num_tasks < 1:
        raise UserError(f"--num-tasks {args.num_tasks}: expected a positive integer")
    check_writable(Path(args.out).parent, f"--out {args.out}: directory")
    files = _files(args.qa, "--qa")
    tasks = build_searchqa(files, args.objectives, args.seed, args.num_tasks)
    info = {"params": {"qa": [str(p) for p in files], "objectives": args.objectives, "seed": args.seed,
                       "num_tasks": args.num_tasks}}
    write_searchqa(args.out, tasks, info, train=args.train, seed=args.seed, overwrite=args.overwrite)
    counts = ", ".join(f"{k} {len(v)}" for k, v in tasks.items())
    print(f"wrote {args.objectives}-objective tasks ({counts}) to {args.out}"
          + (" as one training set" if args.train else ""))
    return 0
