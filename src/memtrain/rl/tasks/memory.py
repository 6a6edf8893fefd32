"""What the memory-agent tasks (``proxy``, ``longqa``) share: the agent, the trajectory's metrics and
readable record, and the budgets of a session (docs/method.md section 1)."""

from __future__ import annotations

from typing import Any, ClassVar

from memtrain.agent.loop import MemoryAgent
from memtrain.agent.types import Trajectory
from memtrain.budgets import check_context_budget
from memtrain.config import Config
from memtrain.engines.base import Engine
from memtrain.errors import UserError
from memtrain.models import UnknownContextError, model_context_length
from memtrain.rl.rewards import get_reward
from memtrain.rl.rollout import E2E, Rollout, SessionShape
from memtrain.scoring import METRICS, REWARD_METRIC


def trajectory_metrics(traj: Trajectory, metric: str, match: float | None = None) -> dict[str, float]:
    """All answer metrics of a trajectory (``e2e_match``: its reward ``match``, by default the answer metric
    ``metric`` - strict boxed EM unless rl.reward_metric says otherwise; ``e2e_<metric>`` the others
    evaluation also reports) plus its shape."""
    scores = traj.scores
    out = {"e2e_match": float(scores.get(metric, 0.0)) if match is None else float(match)}
    out.update({f"e2e_{m}": float(scores.get(m, 0.0)) for m in METRICS if m != metric})
    out["num_turns"] = float(len(traj.turns))
    out["num_chunks"] = float(len(traj.chunks))
    return out


def trajectory_record(traj: Trajectory, sample: dict, reward: float) -> dict[str, Any]:
    return {
        "sample_id": traj.sample_id,
        "question": sample["question"],
        "gold": list(sample["answers"]),
        "num_chunks": len(traj.chunks),
        "truncated": traj.truncated,
        "memories": traj.memories,
        "answer": traj.answer,
        "scores": traj.scores,
        "reward": reward,
    }


def agent_counters(agent: Any) -> dict[str, float]:
    """An agent's step counters (documents, turns, ``imr_none``, ...) as the trainer sums them."""
    return {k: float(v) for k, v in agent.stats.items()}


class MemoryAgentTask:
    """A task whose rollouts are memory-agent trajectories: the run's config, the tokenizer and the reward
    (``rl.reward_metric``, a registered :mod:`memtrain.rl.rewards` name; else strict boxed EM, the paper)."""

    name: ClassVar[str]
    required_fields: ClassVar[tuple[str, ...]]

    def __init__(self, config: Config, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.reward_metric = config.rl.reward_metric or REWARD_METRIC
        self.reward = get_reward(self.reward_metric)

    def match(self, traj: Trajectory) -> float:
        """The reward of a trajectory's final answer against its sample's gold answers."""
        return float(self.reward(traj.answer, traj.golds))

    def agent(self, engine: Engine, samples: list[dict]) -> MemoryAgent:
        """The memory agent on ``engine``, once every sample has the gold answers its reward needs."""
        for s in samples:
            if not s.get("answers"):
                raise UserError(f"sample {s.get('id')!r}: no gold 'answers'; training needs a non-empty list")
        return MemoryAgent(engine, self.tokenizer, self.config.agent)

    def trajectory_rollout(self, traj: Trajectory, samples: list[dict], reward: float,
                           metrics: dict[str, float], **record: Any) -> Rollout:
        """The E2E rollout of ``traj`` (``record``: fields added to its readable record)."""
        summary = {**trajectory_record(traj, samples[traj.sample_index], reward), **record}
        return Rollout(E2E.group_id(traj.sample_id), float(reward), list(traj.turns), E2E, metrics, summary)

    @classmethod
    def imr_answers(cls, config: Config) -> int:
        """IMR answers a trajectory adds to its session (none unless the task trains IMR)."""
        return 0

    @classmethod
    def session_shape(cls, config: Config) -> SessionShape:
        """A memory turn per chunk, the final turn and the IMR answers; prompts of instruction + chunk +
        memory, completions of a memory or an answer."""
        a = config.agent
        if a.max_chunks is None:
            raise UserError("agent.max_chunks is null (read every chunk), so a session's model calls are "
                            "unbounded; training that sizes its batches per session (the verl backend) "
                            "needs a number (paper: 8)")
        calls = a.max_chunks + 1 + cls.imr_answers(config)
        return SessionShape(calls, a.instruction_tokens + a.chunk_tokens + a.memory_tokens,
                            max(a.memory_tokens, a.answer_tokens))

    @classmethod
    def check_budgets(cls, config: Config) -> None:
        """Every turn (the IMR turn too, when trained) fits the model's context, when its config tells it."""
        try:
            context = model_context_length(config.model.name, None)
        except UnknownContextError:
            return  # unknown context: the engine enforces its own limit
        check_context_budget(config.agent, context, config.model.name, imr=cls.imr_answers(config) > 0)
