"""``memtrain answer``: read a long text file chunk by chunk with the memory agent and answer a question.

It runs exactly the loop (and therefore the prompts) that training and ``memtrain eval`` use, greedy by
default, and reports per-chunk progress on stderr. stdout gets the final answer; with ``--show-memory``
each memory state comes first, under a header line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from memtrain.agent.loop import MemoryAgent, TurnCallback
from memtrain.agent.types import Trajectory, Turn
from memtrain.budgets import apply_default_budgets
from memtrain.config import Config, load_config
from memtrain.engines.base import SamplingParams
from memtrain.errors import UserError
from memtrain.progress import Progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("answer", help="answer a question about a long text file with the memory agent",
                       description="Read --document chunk by chunk, rewriting a bounded memory, then answer "
                                   "--question (the same agent and prompts as training and evaluation).")
    p.add_argument("--model", help="policy: short name (smollm2-135m), checkpoint dir or HF name "
                                   "(default: model.name of --config, else smollm2-135m)")
    p.add_argument("--document", required=True, help="UTF-8 text file to read")
    p.add_argument("--question", required=True, help="the question to answer")
    p.add_argument("--engine", help="generation engine: hf, vllm, openai or a registered kind (default: "
                   "engine.kind, hf)")
    p.add_argument("--base-url", help="OpenAI-compatible server URL for --engine openai")
    p.add_argument("--config", help="YAML config whose model/agent/engine sections are used")
    p.add_argument("--chunk-tokens", type=int, help="document tokens per chunk (default without --config: "
                   "1024 for smollm2 on CPU, else 5120, the paper's)")
    p.add_argument("--memory-tokens", type=int, help="cap on each memory (default 128 for smollm2 on CPU, "
                   "else 1024)")
    p.add_argument("--answer-tokens", type=int, help="cap on the final answer (default 64 for smollm2 on "
                   "CPU, else 1024)")
    p.add_argument("--max-chunks", type=int, help="at most this many chunks (default 8)")
    p.add_argument("--truncation", choices=["centre", "head", "error"],
                   help="longer documents: keep head and tail (centre, default), the head, or fail")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature > 0)")
    p.add_argument("--show-memory", action="store_true", help="print every memory state before the answer")
    p.set_defaults(func=_answer)


def build_config(args: argparse.Namespace) -> Config:
    """The config file (or defaults) with the command-line flags applied, validated field by field."""
    cfg = load_config(args.config)
    if args.model:
        cfg.model.name = args.model
    for flag in ("chunk_tokens", "memory_tokens", "answer_tokens", "max_chunks", "truncation"):
        value = getattr(args, flag)
        if value is not None:
            try:
                setattr(cfg.agent, flag, value)
            except ValidationError as exc:
                raise UserError(f"--{flag.replace('_', '-')} {value}: {exc.errors()[0]['msg']}") from None
    if args.engine:
        cfg.engine.kind = args.engine
    if args.base_url:
        cfg.engine.base_url = args.base_url
    return cfg


def read_document(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--document {path}: a directory; expected a UTF-8 text file")
    if not p.is_file():
        raise FileNotFoundError(f"--document {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--document {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise UserError(f"--document {path}: the file is empty")
    return text


def answer_document(agent: MemoryAgent, document: str, question: str, params: SamplingParams,
                    doc_id: str = "document", on_turn: TurnCallback | None = None) -> Trajectory:
    """One trajectory over ``document`` through the shared agent loop (no gold answers, so no scores)."""
    return agent.run([{"id": doc_id, "context": document, "question": question}], params, n=1,
                     on_turn=on_turn)[0]


def _progress(turn_index: int, turn: Turn, num_chunks: int, progress: Progress | None = None) -> None:
    rates = f" [{progress.brief()}]" if progress is not None else ""
    if turn.kind == "memory":
        cap = " (memory cap hit)" if turn.hit_cap else ""
        print(f"chunk {turn.step + 1}/{num_chunks} read: memory of {len(turn.completion_ids)} tokens{cap}"
              f"{rates}", file=sys.stderr, flush=True)
    else:
        cap = " (answer cap hit)" if turn.hit_cap else ""
        print(f"answered with {len(turn.completion_ids)} tokens{cap}{rates}", file=sys.stderr, flush=True)


def _reporter(progress: Progress) -> TurnCallback:
    """Per-turn lines carrying the shared reporter's turns, tokens/s and ETA."""
    def on_turn(turn_index: int, turn: Turn, num_chunks: int) -> None:
        progress.on_turn(turn_index, turn, num_chunks)
        _progress(turn_index, turn, num_chunks, progress)

    return on_turn


def _answer(args: argparse.Namespace) -> int:
    document = read_document(args.document)
    if not args.question.strip():
        raise UserError("--question: empty")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: expected >= 0 (0 = greedy)")
    cfg = build_config(args)
    print(apply_default_budgets(cfg, args.config), file=sys.stderr, flush=True)
    from memtrain.eval.runner import load_engine

    engine, tokenizer = load_engine(cfg)
    agent = MemoryAgent(engine, tokenizer, cfg.agent)  # checks the model's context
    doc = agent.chunk({"id": args.document, "context": document})
    note = f", truncated ({cfg.agent.truncation})" if doc.truncated else ""
    print(f"{args.document}: {doc.num_tokens} tokens -> {len(doc.chunks)} chunks of <= "
          f"{cfg.agent.chunk_tokens}{note}", file=sys.stderr, flush=True)
    params = SamplingParams(temperature=args.temperature, seed=args.seed)
    progress = Progress(args.document, 1, len(doc.chunks) + 1, interval_s=math.inf)
    traj = answer_document(agent, document, args.question, params, doc_id=args.document,
                           on_turn=_reporter(progress))
    if args.show_memory:
        for t, memory in enumerate(traj.memories[1:], start=1):
            print(f"=== memory after chunk {t}/{len(traj.chunks)} ===\n{memory}\n")
        print("=== answer ===")
    print(traj.answer)
    return 0
