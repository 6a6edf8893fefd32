"""``memtrain eval longqa``: long-document multi-hop QA per document size (docs/method.md section 5).

Two modes over the same built sets (``memtrain data longqa``):

* ``memory`` - the memory agent reads the document chunk by chunk with the prompts and chunk / memory /
  answer budgets of training (``config.agent``), but reads EVERY chunk: ``agent.max_chunks`` is a training
  budget (documents up to ~40k tokens) and would drop the middle - where the gold paragraphs usually are -
  of every document above ~300 paragraphs. Truncation happens only when asked (``max_chunks``), and the
  summary, the table and the log then say so;
* ``full-context`` - the baseline rows of the paper's Table 1: the whole document in ONE prompt
  (``full_context`` template). A document that does not fit the model's context (prompt + answer budget) is
  recorded as "too long" and never truncated silently.

Decoding follows MemAgent's RULER-HotpotQA evaluation (``taskutils/memory_eval/ruler_hqa.py`` and
``utils/recurrent.py`` in BytedTsinghua-SIA/MemAgent): one sample per question at temperature 0.7, top-p
0.95, the whole document read (``run.py`` sets no context limit for the memory agent). We add a fixed
default seed so a run is reproducible; ``temperature=0`` is greedy. Everything that defines the numbers
(decoding, seed, budgets, chunk limit) is the summary's ``protocol``, shown in ``results.md`` and part of
the resume check, so a resumed run never mixes protocols.

Results go to a run directory (see ``memtrain.eval.report``): every example is appended to
``examples.jsonl`` as soon as its batch finishes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from memtrain.agent.chunking import Truncation
from memtrain.agent.loop import MemoryAgent
from memtrain.config import AgentConfig, Config
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
from memtrain.errors import UserError
from memtrain.eval.registry import register_eval
from memtrain.eval.report import check_decoding_args, summarize, write_report
from memtrain.eval.runner import EvalRun, Evaluator, Row, load_engine, run_eval
from memtrain.log import logger
from memtrain.models import model_context_length
from memtrain.progress import Progress, estimate_turns
from memtrain.prompts import render
from memtrain.scoring import extract_answer, score

Mode = Literal["memory", "full-context"]
COLUMNS = ("id", "context", "question", "answers")  # what each row must have
EXTRA_KEYS = ("num_doc_tokens", "truncated")  # mean tokens; share of documents cut to max_chunks
# MemAgent's RULER-HotpotQA decoding (ruler_hqa.py: temperature=0.7, top_p=0.95, --sampling 1); the seed is
# ours (MemAgent sets none) so that a sampled evaluation can be repeated exactly.
TEMPERATURE = 0.7
TOP_P = 0.95
SEED = 0
SAMPLES = 1


def eval_agent_config(agent: AgentConfig, max_chunks: int | None = None,
                      truncation: Truncation | None = None) -> AgentConfig:
    """The agent evaluation runs: ``agent``'s budgets and prompts, every chunk read unless ``max_chunks``.

    ``agent.max_chunks`` / ``agent.truncation`` are training budgets and are not applied here: cutting an
    evaluation document must be asked for explicitly (``--max-chunks``, then ``--truncation``).
    """
    if max_chunks is not None and max_chunks < 1:
        raise UserError(f"--max-chunks {max_chunks}: expected a positive number of chunks (leave it out to "
                        "read every chunk)")
    if max_chunks is None and truncation is not None:
        raise UserError(f"--truncation {truncation}: only applies with --max-chunks N (without it every "
                        "chunk is read)")
    return AgentConfig.model_validate({**agent.model_dump(), "max_chunks": max_chunks,
                                       "truncation": truncation or agent.truncation})


def truncation_warning(max_chunks: int, truncation: str, cut: int, total: int) -> str:
    """The line every report of a truncated evaluation carries."""
    if cut == 0:
        return (f"--max-chunks {max_chunks} ({truncation}) asked for truncation, but no document needed more "
                f"than {max_chunks} chunks (0/{total} cut): every chunk was read")
    return (f"TRUNCATED EVALUATION: --max-chunks {max_chunks} ({truncation}) cut {cut}/{total} documents, "
            "whose unread parts may hold the gold paragraphs; MemAgent's protocol reads every chunk, so "
            "these scores are not comparable to the paper's Table 1")


def _turns(agent: AgentConfig, row: Mapping[str, Any]) -> int:
    """Estimated memory-agent turns of one row (for the progress total)."""
    return estimate_turns(len(row["context"]), agent.chunk_tokens, agent.max_chunks)


def _sample(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "context": row["context"], "question": row["question"],
            "answers": row["answers"]}


def _memory_records(agent: MemoryAgent, rows: list[dict[str, Any]], size: int,
                    params: SamplingParams, progress: Progress | None = None) -> list[dict[str, Any]]:
    if progress is not None:
        progress.batch([_turns(agent.config, r) for r in rows])
    trajs = agent.run([_sample(r) for r in rows], params, n=1,
                      on_turn=None if progress is None else progress.on_turn)
    out = []
    for row, traj in zip(rows, trajs, strict=True):
        out.append({"key": f"{size}/{row['id']}", "group": str(size), "id": row["id"], "status": "ok",
                    "question": row["question"], "gold": list(row["answers"]), "prediction": traj.answer,
                    "extracted": extract_answer(traj.answer), "metrics": traj.scores,
                    "memories": traj.memories, "num_chunks": len(traj.chunks), "truncated": traj.truncated,
                    "num_doc_tokens": traj.num_doc_tokens,
                    "memory_cap_hits": sum(t.hit_cap for t in traj.memory_turns),
                    "answer_hit_cap": traj.final_turn.hit_cap})
    return out


def _full_context_records(engine: Engine, tokenizer: Any, cfg: Config, rows: list[dict[str, Any]], size: int,
                          params: SamplingParams, max_context: int) -> list[dict[str, Any]]:
    """One prompt per document; those over ``max_context`` (with the answer budget) become "too long"."""
    budget = cfg.agent.answer_tokens
    records: list[dict[str, Any]] = []
    requests = []
    for row in rows:
        text, ids = render(tokenizer, "full_context", cfg.agent.templates, problem=row["question"],
                           chunk=row["context"])
        base = {"key": f"{size}/{row['id']}", "group": str(size), "id": row["id"],
                "question": row["question"], "gold": list(row["answers"]), "prompt_tokens": len(ids),
                "num_doc_tokens": len(tokenizer(row["context"], add_special_tokens=False)["input_ids"])}
        if len(ids) + budget > max_context:
            records.append({**base, "status": "too_long", "prediction": None, "metrics": None,
                            "reason": f"prompt {len(ids)} + answer {budget} tokens > context {max_context}"})
        else:
            records.append(base)
            requests.append(GenerationRequest(prompt_ids=ids, params=replace(params, max_tokens=budget, n=1),
                                              prompt_text=text))
    outputs = iter(engine.generate(requests) if requests else [])
    out = []
    for rec in records:
        if "status" not in rec:
            completion = next(outputs)[0]
            rec = {**rec, "status": "ok", "prediction": completion.text,
                   "extracted": extract_answer(completion.text),
                   "metrics": score(completion.text, rec["gold"]),
                   "answer_hit_cap": completion.finish_reason == "length"}
        out.append(rec)
    return out


def _protocol(cfg: Config, agent_cfg: AgentConfig | None, temperature: float, top_p: float,
              seed: int | None, batch_size: int) -> dict[str, Any]:
    """Everything that defines the numbers (decoding, seed, budgets, chunks read): a resume must match it."""
    from memtrain.precision import compute_dtype_name  # torch: only when evaluating

    protocol: dict[str, Any] = {"decoding": "greedy" if temperature == 0 else "sampled",
                                "temperature": temperature, "top_p": top_p, "seed": seed, "samples": SAMPLES,
                                # sampled seeds derive from a question's place in its batch
                                "batch_size": batch_size if temperature > 0 else None,
                                "compute_dtype": compute_dtype_name(cfg.model.compute_dtype,
                                                                    cfg.model.device)}
    if agent_cfg is None:
        return {**protocol, "answer_tokens": cfg.agent.answer_tokens}
    a = agent_cfg
    every = a.max_chunks is None
    return {**protocol, "chunk_tokens": a.chunk_tokens, "memory_tokens": a.memory_tokens,
            "answer_tokens": a.answer_tokens, "max_chunks": a.max_chunks,
            "truncation": None if every else a.truncation,
            "reads": "every chunk" if every else f"at most {a.max_chunks} chunks"}


def _evaluator(cfg: Config, agent_cfg: AgentConfig | None, params: SamplingParams, max_context: int | None,
               engine: Engine | None, tokenizer: Any) -> Evaluator:
    """The engine loaded and the batch function of the mode: the memory agent, or one full-context prompt
    per document (the model's context is the budget)."""
    engine, tokenizer = load_engine(cfg, engine, tokenizer)
    if agent_cfg is not None:
        agent = MemoryAgent(engine, tokenizer, agent_cfg)

        def memory(size: str, b: int, rows: list[Row], progress: Progress) -> list[dict[str, Any]]:
            return _memory_records(agent, rows, int(size), params, progress)

        def caps() -> None:
            logger.info("longqa eval: memory cap hit-rate %.3f, answer cap hit-rate %.3f",
                        *agent.cap_rates().values())

        return Evaluator(memory, caps)
    # full-context mode: the model's context is the budget, one turn per document
    context = max_context or model_context_length(cfg.model.name, tokenizer)
    logger.info("longqa eval: full-context mode, model context %d tokens", context)

    def full(size: str, b: int, rows: list[Row], progress: Progress) -> list[dict[str, Any]]:
        records = _full_context_records(engine, tokenizer, cfg, rows, int(size), params, context)
        progress.add(docs=len(rows), turns=len(rows))
        return records

    return Evaluator(full)


def run_longqa_eval(cfg: Config, data_dir: str | Path, out_dir: str | Path, mode: Mode = "memory",
                    limit: int | None = None, batch_size: int = 16, temperature: float = TEMPERATURE,
                    top_p: float = TOP_P, seed: int | None = SEED, max_chunks: int | None = None,
                    truncation: Truncation | None = None, max_context: int | None = None,
                    engine: Engine | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on every size of the set in ``data_dir``; returns the summary it writes.

    Memory mode reads every chunk unless ``max_chunks`` is given (see :func:`eval_agent_config`).
    """
    from memtrain.data.dataset import load_rows, require_columns  # pyarrow: only when evaluating
    from memtrain.data.longqa import eval_sets

    if mode not in ("memory", "full-context"):
        raise UserError(f"--mode {mode!r}: expected 'memory' or 'full-context'")
    check_decoding_args(limit, batch_size, temperature, top_p, unit="questions per size")
    if mode != "memory" and (max_chunks is not None or truncation is not None):
        raise UserError(f"--max-chunks / --truncation: apply to --mode memory only, not {mode}")
    out = Path(out_dir)
    for _, d in eval_sets(data_dir):  # a set built for another task fails here, before any model loads
        require_columns(d, COLUMNS, "longqa")
    sets = [(n, load_rows(d)[:limit]) for n, d in eval_sets(data_dir)]
    agent_cfg = eval_agent_config(cfg.agent, max_chunks, truncation) if mode == "memory" else None
    meta: dict[str, Any] = {"task": "longqa", "model": cfg.model.name, "data": str(Path(data_dir).resolve()),
                            "mode": mode, "limit": limit, "engine": cfg.engine.kind,
                            "templates": dict(cfg.agent.templates),
                            "protocol": _protocol(cfg, agent_cfg, temperature, top_p, seed, batch_size)}
    if agent_cfg is not None and agent_cfg.max_chunks is not None:
        logger.warning("longqa eval: --max-chunks %d: longer documents are truncated (%s); MemAgent's "
                       "protocol reads every chunk", agent_cfg.max_chunks, agent_cfg.truncation)
    elif agent_cfg is not None:
        logger.info("longqa eval: reading every chunk (agent.max_chunks=%s of the config is a training "
                    "budget; --max-chunks N truncates)", cfg.agent.max_chunks)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)

    def start() -> Evaluator:
        return _evaluator(cfg, agent_cfg, params, max_context, engine, tokenizer)

    def summarize_run(records: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize(records, "longqa", [str(n) for n, _ in sets], meta, EXTRA_KEYS)
        if agent_cfg is not None and agent_cfg.max_chunks is not None:
            cut = sum(bool(r.get("truncated")) for r in records)
            summary["warnings"] = [truncation_warning(agent_cfg.max_chunks, agent_cfg.truncation, cut,
                                                      len(records))]
            logger.warning("longqa eval: %s", summary["warnings"][0])
        write_report(out, summary, EXTRA_KEYS)
        return summary

    turns = (lambda row: _turns(agent_cfg, row)) if agent_cfg is not None else (lambda row: 1)
    return run_eval(EvalRun("longqa eval", out, meta, {str(n): rows for n, rows in sets}, batch_size, start,
                            summarize_run, turns=turns))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["memory", "full-context"], default="memory",
                   help="memory agent (default) or whole document in one prompt")
    p.add_argument("--max-context", type=int, metavar="TOKENS",
                   help="full-context: the model's context length (default: from its config)")
    # decoding defaults (MemAgent's protocol) are run_longqa_eval's; a flag left out is not passed
    decoding = p.add_mutually_exclusive_group()
    decoding.add_argument("--temperature", type=float,
                          help=f"sampling temperature (default {TEMPERATURE}, MemAgent's; 0 = greedy)")
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (= --temperature 0)")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default {TOP_P}, MemAgent's)")
    p.add_argument("--seed", type=int, help=f"sampling seed (default {SEED}, so that runs are reproducible)")
    p.add_argument("--max-chunks", type=int, metavar="N",
                   help="memory mode: read at most N chunks per document, truncating longer ones (reported "
                   "as a warning); default: every chunk, as MemAgent evaluates (agent.max_chunks is unused)")
    p.add_argument("--truncation", choices=["centre", "head", "error"],
                   help="with --max-chunks: keep head and tail chunks (default: agent.truncation), the "
                   "first chunks, or fail")


@register_eval("longqa", help="accuracy per document length (RULER-HotpotQA, paper Table 1)",
               description="Memory agent (default) or the whole document in one prompt (--mode "
               "full-context, 'too long' where it does not fit). MemAgent's protocol: every chunk read, "
               f"temperature {TEMPERATURE}, top-p {TOP_P}, seed {SEED}.",
               main_metric="sub_em", arguments=_arguments)
def longqa_command(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """``memtrain eval longqa``: the flags given, the protocol's defaults for the others."""
    if args.max_chunks is not None:
        print(f"warning: --max-chunks {args.max_chunks}: longer documents are truncated and their unread "
              "parts may hold the answer; MemAgent's protocol reads every chunk", file=sys.stderr)
    decoding = {k: v for k, v in (("temperature", 0.0 if args.greedy else args.temperature),
                                  ("top_p", args.top_p), ("seed", args.seed)) if v is not None}
    return run_longqa_eval(cfg, args.data, args.out, mode=args.mode, limit=args.limit,
                           batch_size=args.batch_size, max_chunks=args.max_chunks, truncation=args.truncation,
                           max_context=args.max_context, **decoding)
