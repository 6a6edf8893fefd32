"""``train.task: searchqa`` - MEM1-style search-QA post-training (docs/method.md section 6).

G search episodes per row (``memtrain.agent.search``); every model turn of an episode is a training
sequence (kind ``search``) carrying the episode's advantage. Reward = mean EM over the row's objectives
(``memtrain.scoring.score_multi``, ``em`` metric); a malformed reply ends the episode with reward 0 and is
counted (``malformed``), as is an episode that never answers (``no_answer``). All answer metrics are logged
next to the reward, so the reward metric is never confused with the evaluation ones.
"""

from __future__ import annotations

import random
from typing import Any

from memtrain.agent.search import SearchAgent, SearchAgentConfig, SearchEpisode
from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.errors import UserError
from memtrain.retrieval.service import SearchBackend, open_retriever
from memtrain.rl.rollout import SEARCH, Rollout, SessionShape
from memtrain.rl.tasks.registry import register_task
from memtrain.scoring import METRICS


def episode_metrics(ep: SearchEpisode) -> dict[str, float]:
    """Per-episode numbers the trainer averages (the step counters are totals named ``search_<stat>``)."""
    out = {f"search_{m}": float(ep.scores.get(m, 0.0)) for m in METRICS}
    out.update(search_malformed_rate=float(ep.outcome == "malformed"),
               search_no_answer_rate=float(ep.outcome == "no_answer"),
               search_turns_per_episode=float(len(ep.turns)),
               search_queries_per_episode=float(len(ep.queries)))
    return out


@register_task("searchqa")
class SearchQATask:
    """Multi-objective search QA with the search agent; reward = mean EM over objectives (by default), 0 for
    malformed or unanswered episodes."""

    required_fields = ("id", "question", "objective_answers")

    def __init__(self, config: Config, tokenizer: Any, backend: SearchBackend | None = None) -> None:
        if backend is None and not config.search.retriever:
            raise UserError("train.task=searchqa needs search.retriever: the URL of `memtrain "
                            "serve-retriever`, an index directory or a corpus JSONL "
                            "(e.g. search.retriever=http://127.0.0.1:8001)")
        self.config = config
        self.tokenizer = tokenizer
        self.reward_metric = config.rl.reward_metric or "em"
        if self.reward_metric not in METRICS:  # an episode answers several objectives (scoring.score_multi)
            raise UserError(f"train.task=searchqa: rl.reward_metric={self.reward_metric!r}; search episodes "
                            f"are scored per objective by the answer metrics only: {', '.join(METRICS)}")
        self.agent_config = SearchAgentConfig.from_config(config)
        self._backend = backend

    @property
    def backend(self) -> SearchBackend:
        """The retriever, opened on first use (a corpus JSONL is indexed once and cached)."""
        if self._backend is None:
            s = self.config.search
            self._backend = open_retriever(s.retriever, kind=s.index_kind, embedder=s.embedder)
        return self._backend

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        agent = SearchAgent(engine, self.tokenizer, self.backend, self.agent_config)
        episodes = agent.run(samples, params, n=group_size)
        out = []
        for ep in episodes:
            sample = samples[ep.sample_index]
            reward = float(ep.scores.get(self.reward_metric, 0.0)) if ep.outcome == "answer" else 0.0
            out.append(Rollout(
                group=SEARCH.group_id(ep.sample_id), reward=reward, turns=list(ep.turns), kind=SEARCH,
                metrics=episode_metrics(ep),
                record={"sample_id": ep.sample_id, "question": sample["question"],
                        "gold": sample["objective_answers"], "outcome": ep.outcome, "reason": ep.reason,
                        "trace": ep.trace(), "answer": ep.answer, "scores": ep.scores, "reward": reward}))
        return out, {f"search_{k}": float(v) for k, v in agent.stats.items()}

    @classmethod
    def session_shape(cls, config: Config) -> SessionShape:
        """One model call per turn; prompts of instruction + search results + memory, completions of a memory
        with a query or an answer."""
        a, s = config.agent, config.search
        return SessionShape(s.max_turns, a.instruction_tokens + s.results_tokens + a.memory_tokens,
                            max(a.memory_tokens, a.answer_tokens, s.response_tokens))

    @classmethod
    def check_budgets(cls, config: Config) -> None:
        """Nothing to check before loading: a search turn's prompt is bounded by the ``search.*`` caps, not
        by the memory agent's chunk budgets, and the engine enforces the model's limit."""
