"""``train.task: longqa`` - MemAgent-style long-document QA post-training (docs/method.md section 5): the
memory agent reads the document; reward = the final answer's strict boxed EM (by default) against all gold
answers; no IMR."""

from __future__ import annotations

import random

from memtrain.engines.base import Engine, SamplingParams
from memtrain.rl.rollout import Rollout
from memtrain.rl.tasks.memory import MemoryAgentTask, agent_counters, trajectory_metrics
from memtrain.rl.tasks.registry import register_task


@register_task("longqa")
class LongQATask(MemoryAgentTask):
    """G trajectories per row, each rewarded by its final answer alone."""

    required_fields = ("id", "context", "question", "answers")

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        agent = self.agent(engine, samples)
        out = []
        for traj in agent.run(samples, params, n=group_size):
            metrics = trajectory_metrics(traj, self.reward_metric, self.match(traj))
            out.append(self.trajectory_rollout(traj, samples, metrics["e2e_match"], metrics))
        return out, agent_counters(agent)
