"""Rollout tasks: what the GRPO trainer samples for a batch of rows, and how each sample is rewarded.

A task turns rows into :class:`Rollout` objects, one per GRPO group member. The trainer does the rest, the
same way for every task: advantages within each ``group``, the DAPO filter, one training sequence per turn
with the rollout's advantage broadcast to all of its turns, one policy update.

- :class:`ProxyTask` (``train.task: proxy``, MEMTRAIN.md sections 2-4): G1 memory-agent trajectories per row
  (E2E masked-entity reconstruction) plus, per trajectory, one intermediate-memory-recall prompt answered G2
  times. R_E(i) = match(i) + lambda / G2 * sum_j R_I(i, j); a trajectory with no valid IMR prompt gets no
  bonus (counted as ``imr_none``).
- :class:`LongQATask` (``train.task: longqa``, section 5): the same agent, reward = strict boxed EM of the
  final answer against all gold answers; no IMR.

``TASKS`` maps ``train.task`` to a factory ``(config, tokenizer) -> Task``; other tasks (search QA) register
themselves there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from memtrain.agent.imr import run_imr
from memtrain.agent.loop import MemoryAgent
from memtrain.agent.types import Trajectory, Turn
from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.rl.core import e2e_rewards
from memtrain.rl.searchqa import SearchQATask
from memtrain.scoring import METRICS, REWARD_METRIC, score


@dataclass
class Rollout:
    """One GRPO group member.

    ``group``: advantage group id, unique within a step (``{sample_id}/e2e`` for the G1 trajectories of a
    sample, ``{sample_id}/{i}/imr`` for the G2 answers to trajectory i's IMR prompt). ``turns``: every model
    call of the member (all memory turns + the final turn, or one IMR turn); each becomes a training sequence
    with the rollout's advantage. ``metrics``: per-rollout numbers the trainer averages over the step's
    rollouts that have them. ``record``: a readable summary for ``samples.jsonl``.
    """

    group: str
    reward: float
    turns: list[Turn]
    kind: str  # 'e2e' | 'imr' | 'search'
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    required_fields: tuple[str, ...]  # row keys the task reads; checked on every row before training starts
    reward_metric: str  # the answer metric its rewards use (``rl.reward_metric`` or the task's default)

    def rollout(
        self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int, rng: random.Random
    ) -> tuple[list[Rollout], dict[str, float]]:
        """Sample ``group_size`` members per row and reward them. Returns the rollouts and step counters
        (summed over the step's rollout rounds, e.g. ``imr_none``)."""
        ...


def _trajectory_metrics(traj: Trajectory, metric: str) -> dict[str, float]:
    """All answer metrics of a trajectory (``e2e_match`` is the reward metric, by default strict boxed EM;
    ``e2e_<metric>`` the others evaluation also reports) plus its shape."""
    scores = traj.scores
    out = {"e2e_match": float(scores.get(metric, 0.0))}
    out.update({f"e2e_{m}": float(scores.get(m, 0.0)) for m in METRICS if m != metric})
    out["num_turns"] = float(len(traj.turns))
    out["num_chunks"] = float(len(traj.chunks))
    return out


def _trajectory_record(traj: Trajectory, sample: dict, reward: float) -> dict[str, Any]:
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


def _golds(sample: dict) -> None:
    if not sample.get("answers"):
        raise ValueError(f"sample {sample.get('id')!r}: no gold 'answers'; training needs a non-empty list")


class MemoryAgentTask:
    """What the memory-agent tasks share: the run's config, the tokenizer and the reward metric
    (``rl.reward_metric``, else strict boxed EM as in the paper)."""

    def __init__(self, config: Config, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.reward_metric = config.rl.reward_metric or REWARD_METRIC


class ProxyTask(MemoryAgentTask):
    """E2E masked-entity reconstruction + intermediate memory recall (the MemTrain proxy objective)."""

    name = "proxy"
    required_fields = ("id", "context", "question", "answers", "entity_spans")

    def rollout(
        self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int, rng: random.Random
    ) -> tuple[list[Rollout], dict[str, float]]:
        rl = self.config.rl
        for s in samples:
            _golds(s)
        agent = MemoryAgent(engine, self.tokenizer, self.config.agent)
        trajs = agent.run(samples, params, n=group_size)
        g2 = rl.imr_group_size
        imr_matches = [[0.0] * g2 for _ in trajs]
        imr_rollouts: list[Rollout] = []
        imr_info: list[dict[str, Any] | None] = [None] * len(trajs)
        if rl.imr:
            prompts = agent.imr_prompts(trajs, samples, rng)
            valid = [(i, p) for i, p in enumerate(prompts) if p is not None]
            answers = run_imr(engine, [p for _, p in valid], params, g2, self.config.agent.answer_tokens)
            for (i, prompt), turns in zip(valid, answers, strict=True):
                traj = trajs[i]
                group = f"{traj.sample_id}/{i % group_size}/imr"
                matches = []
                for turn in turns:
                    scores = score(turn.text, prompt.label)
                    match = float(scores[self.reward_metric])
                    matches.append(match)
                    imr_rollouts.append(
                        Rollout(
                            group=group,
                            reward=match,
                            turns=[turn],
                            kind="imr",
                            metrics={"imr_match": match, "imr_sub_em": float(scores["sub_em"])},
                            record={"sample_id": traj.sample_id, "label": prompt.label, "answer": turn.text},
                        )
                    )
                imr_matches[i] = matches
                imr_info[i] = {
                    "step_k": prompt.step_k,
                    "chunk_l": prompt.chunk_l,
                    "label": prompt.label,
                    "entity_label": prompt.entity_label,
                    "answers": [t.text for t in turns],
                    "matches": matches,
                }
        match = [float(t.scores.get(self.reward_metric, 0.0)) for t in trajs]
        rewards = e2e_rewards(match, imr_matches if rl.imr else None, rl.imr_lambda).tolist()
        e2e = []
        for i, (traj, reward) in enumerate(zip(trajs, rewards, strict=True)):
            metrics = _trajectory_metrics(traj, self.reward_metric)
            if rl.imr:
                metrics["imr_bonus"] = reward - match[i]
                metrics["imr_prompt_found"] = float(imr_info[i] is not None)
            record = _trajectory_record(traj, samples[traj.sample_index], reward)
            record["imr"] = imr_info[i]
            e2e.append(
                Rollout(
                    group=f"{traj.sample_id}/e2e",
                    reward=float(reward),
                    turns=list(traj.turns),
                    kind="e2e",
                    metrics=metrics,
                    record=record,
                )
            )
        counters = {k: float(v) for k, v in agent.stats.items()}
        return e2e + imr_rollouts, counters


class LongQATask(MemoryAgentTask):
    """MemAgent-style long-document QA post-training: final-answer strict EM reward (by default), no IMR."""

    name = "longqa"
    required_fields = ("id", "context", "question", "answers")

    def rollout(
        self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int, rng: random.Random
    ) -> tuple[list[Rollout], dict[str, float]]:
        for s in samples:
            _golds(s)
        agent = MemoryAgent(engine, self.tokenizer, self.config.agent)
        trajs = agent.run(samples, params, n=group_size)
        out = []
        for traj in trajs:
            metrics = _trajectory_metrics(traj, self.reward_metric)
            reward = metrics["e2e_match"]
            out.append(
                Rollout(
                    group=f"{traj.sample_id}/e2e",
                    reward=reward,
                    turns=list(traj.turns),
                    kind="e2e",
                    metrics=metrics,
                    record=_trajectory_record(traj, samples[traj.sample_index], reward),
                )
            )
        return out, {k: float(v) for k, v in agent.stats.items()}


TaskFactory = Callable[[Config, Any], Task]

TASKS: dict[str, TaskFactory] = {
    "proxy": ProxyTask,
    "longqa": LongQATask,
    "searchqa": SearchQATask,
}


def make_task(config: Config, tokenizer: Any) -> Task:
    """The task ``config.train.task`` names, built for ``tokenizer``."""
    name = config.train.task
    factory = TASKS.get(name)
    if factory is None:
        raise ValueError(
            f"train.task {name!r} has no registered task (registered: {', '.join(sorted(TASKS))}); "
            "a task module registers itself in memtrain.rl.tasks.TASKS"
        )
    return factory(config, tokenizer)


def check_rows(task: Task, rows: list[dict], source: str) -> None:
    """Fail before any model is loaded when the dataset lacks a field the task reads."""
    if not rows:
        raise ValueError(f"{source}: the dataset has no rows")
    for i, row in enumerate(rows):
        missing = [f for f in task.required_fields if f not in row or row[f] is None]
        if missing:
            raise ValueError(
                f"{source}: row {i} (id {row.get('id')!r}) lacks {', '.join(missing)}, which "
                f"train.task={task.name!r} needs (fields: {', '.join(task.required_fields)}); "
                "was the dataset built for another task?"
            )
