"""``memtrain eval searchqa``: multi-objective search QA per data set (docs/method.md section 6).

The search agent (``memtrain.agent.search``) runs with the retriever the spec names (URL of ``memtrain
serve-retriever``, an index directory, or a corpus JSONL indexed with BM25 once and cached). Each example's
EM is averaged over its objectives (``score_multi``); the table shows it per data set and the average over
data sets, along with how often episodes were malformed or never answered. Resumable like every eval.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.errors import UserError
from memtrain.eval.registry import register_eval
from memtrain.eval.report import check_decoding_args, summarize, write_report
from memtrain.eval.runner import EvalRun, Evaluator, Row, load_engine, run_eval
from memtrain.log import logger
from memtrain.progress import Progress

if TYPE_CHECKING:
    from memtrain.agent.search import SearchAgentConfig, SearchEpisode
    from memtrain.retrieval.service import SearchBackend

EXTRA_KEYS = ("turns", "searches", "malformed", "no_answer")


def sample_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset row as the search agent's sample (per-objective golds; one objective for plain rows)."""
    golds = row.get("objective_answers") or [list(row["answers"])]
    return {"id": row["id"], "question": row["question"], "objective_answers": [list(g) for g in golds]}


def episode_record(row: Mapping[str, Any], group: str, ep: SearchEpisode) -> dict[str, Any]:
    return {"key": f"{group}/{row['id']}", "group": group, "id": row["id"], "status": "ok",
            "question": row["question"], "gold": sample_of(row)["objective_answers"],
            "prediction": ep.answer, "outcome": ep.outcome, "reason": ep.reason, "metrics": ep.scores,
            "queries": ep.queries, "trace": ep.trace(), "turns": len(ep.turns), "searches": len(ep.queries),
            "malformed": float(ep.outcome == "malformed"), "no_answer": float(ep.outcome == "no_answer"),
            "response_cap_hits": sum(t.hit_cap for t in ep.turns)}


def _evaluator(cfg: Config, agent_cfg: SearchAgentConfig, spec: str | None, backend: SearchBackend | None,
               engine: Engine | None, tokenizer: Any, temperature: float, seed: int | None) -> Evaluator:
    """The retriever opened, the engine loaded and the search agent's batch function."""
    from memtrain.agent.search import SearchAgent
    from memtrain.retrieval.service import open_retriever

    if backend is None:
        backend = open_retriever(spec, kind=cfg.search.index_kind, embedder=cfg.search.embedder)
    engine, tokenizer = load_engine(cfg, engine, tokenizer)
    agent = SearchAgent(engine, tokenizer, backend, agent_cfg)
    params = SamplingParams(temperature=temperature, seed=seed)

    def batch(name: str, b: int, rows: list[Row], progress: Progress) -> list[dict[str, Any]]:
        episodes = agent.run([sample_of(r) for r in rows], params, n=1)
        turns = sum(len(ep.turns) for ep in episodes)
        # turns are known only when an episode ends: the total counts each at max_turns until then
        progress.total_turns -= len(rows) * agent_cfg.max_turns - turns
        progress.add(docs=len(rows), turns=turns,
                     tokens=sum(len(t.completion_ids) for ep in episodes for t in ep.turns))
        return [episode_record(r, name, ep) for r, ep in zip(rows, episodes, strict=True)]

    return Evaluator(batch, lambda: logger.info("searchqa eval: %s", ", ".join(
        f"{k} {v}" for k, v in agent.stats.items())))


def run_searchqa_eval(cfg: Config, data_dir: str | Path, out_dir: str | Path, retriever: str | None = None,
                      limit: int | None = None, batch_size: int = 16, temperature: float = 0.0,
                      seed: int | None = None, engine: Engine | None = None, tokenizer: Any = None,
                      backend: SearchBackend | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on every data set of ``data_dir``; returns the summary it writes.

    ``retriever`` overrides ``cfg.search.retriever``; ``backend`` (an open retriever) overrides both.
    """
    # numpy, pyarrow: only when evaluating (every `memtrain` start imports this module)
    from memtrain.agent.search import SearchAgentConfig
    from memtrain.data.dataset import load_rows, require_columns
    from memtrain.data.searchqa import eval_sets

    check_decoding_args(limit, batch_size, temperature, 1.0, unit="tasks per data set")
    spec = retriever or cfg.search.retriever
    if backend is None and not spec:
        raise UserError("--retriever: required (URL of `memtrain serve-retriever`, an index directory or a "
                        "corpus JSONL), or set search.retriever in the config")
    groups: dict[str, list[dict[str, Any]]] = {}
    for _, d in eval_sets(data_dir):
        require_columns(d, ("id", "question", "answers"), "searchqa")
        for row in load_rows(d):
            groups.setdefault(str(row.get("dataset") or Path(d).name), []).append(row)
    groups = {name: rows[:limit] for name, rows in groups.items()}
    agent_cfg = SearchAgentConfig.from_config(cfg)
    out = Path(out_dir)
    meta: dict[str, Any] = {
        "task": "searchqa", "model": cfg.model.name, "data": str(Path(data_dir).resolve()),
        "retriever": spec if backend is None else "<in-process>", "limit": limit, "temperature": temperature,
        "seed": seed, "engine": cfg.engine.kind,
        # sampled seeds derive from a task's place in its batch
        "batch_size": batch_size if temperature > 0 else None,
        "search": {"max_turns": agent_cfg.max_turns, "response_tokens": agent_cfg.response_tokens,
                   "results_tokens": agent_cfg.results_tokens, "top_k": agent_cfg.top_k},
        "templates": dict(cfg.agent.templates)}
    def start() -> Evaluator:
        return _evaluator(cfg, agent_cfg, spec, backend, engine, tokenizer, temperature, seed)

    def summarize_run(records: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize(records, "searchqa", list(groups), meta, EXTRA_KEYS)
        write_report(out, summary, EXTRA_KEYS)
        return summary

    return run_eval(EvalRun("searchqa eval", out, meta, groups, batch_size, start, summarize_run,
                            turns=lambda row: agent_cfg.max_turns))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature > 0)")
    p.add_argument("--retriever", help="URL of `memtrain serve-retriever`, an index directory, or a corpus "
                   "JSONL (BM25 index built once and cached); default search.retriever of the config")


# the search agent has budgets of its own (search.*), not the memory agent's
@register_eval("searchqa", help="EM per data set with the search agent (paper Table 2)", main_metric="em",
               arguments=_arguments, agent_budgets=False)
def searchqa_command(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """``memtrain eval searchqa``."""
    return run_searchqa_eval(cfg, args.data, args.out, retriever=args.retriever, limit=args.limit,
                             batch_size=args.batch_size, temperature=args.temperature, seed=args.seed)
