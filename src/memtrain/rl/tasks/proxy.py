"""``train.task: proxy`` - the MemTrain proxy objective (MEMTRAIN.md sections 2-4).

Per row, G1 memory-agent trajectories reconstruct the masked entity (E2E); per trajectory, one
intermediate-memory-recall prompt (a memory and an earlier chunk with a ``[TARGET]`` entity) is answered G2
times. R_E(i) = match(i) + lambda / G2 * sum_j R_I(i, j); a trajectory with no valid IMR prompt gets no bonus
(counted as ``imr_none``). The E2E group of a row and the IMR group of each trajectory are advantage groups
of their own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from memtrain.agent.imr import ImrPrompt, run_imr
from memtrain.agent.loop import MemoryAgent
from memtrain.agent.types import Trajectory, Turn
from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.rl.core import e2e_rewards
from memtrain.rl.rollout import IMR, Rollout
from memtrain.rl.tasks.memory import MemoryAgentTask, agent_counters, trajectory_metrics
from memtrain.rl.tasks.registry import register_task
from memtrain.scoring import score


@dataclass
class ImrGroup:
    """The G2 scored answers to one trajectory's IMR prompt (section 3)."""

    trajectory: int  # the trajectory's index in the step's list (sample-major: G1 per row)
    prompt: ImrPrompt
    turns: list[Turn]
    scores: list[dict[str, float]]  # every answer metric of each answer against the prompt's label
    metric: str  # the reward metric

    @property
    def matches(self) -> list[float]:
        """R_I(i, j) for the G2 answers j."""
        return [float(s[self.metric]) for s in self.scores]

    def record(self) -> dict[str, Any]:
        """What samples.jsonl shows of it, inside its trajectory's record."""
        p = self.prompt
        return {"step_k": p.step_k, "chunk_l": p.chunk_l, "label": p.label, "entity_label": p.entity_label,
                "answers": [t.text for t in self.turns], "matches": self.matches}


@register_task("proxy")
class ProxyTask(MemoryAgentTask):
    """E2E masked-entity reconstruction + intermediate memory recall, the IMR recall paying into R_E."""

    required_fields = ("id", "context", "question", "answers", "entity_spans")

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        """Sections 3-4 in order: trajectories -> IMR groups -> rewards -> rollouts."""
        agent = self.agent(engine, samples)
        trajs = agent.run(samples, params, n=group_size)
        imr = self.imr_groups(agent, engine, trajs, samples, params, rng)
        rewards = self.e2e_rewards(trajs, imr)
        rollouts = self.trajectory_rollouts(trajs, samples, rewards, imr) + self.imr_rollouts(trajs, imr,
                                                                                              group_size)
        return rollouts, agent_counters(agent)

    def imr_groups(self, agent: MemoryAgent, engine: Engine, trajs: list[Trajectory], samples: list[dict],
                   params: SamplingParams, rng: random.Random) -> list[ImrGroup | None]:
        """Per trajectory, its IMR prompt answered G2 times and scored (None: no valid prompt, or IMR off)."""
        groups: list[ImrGroup | None] = [None] * len(trajs)
        if not self.config.rl.imr:
            return groups
        prompts = agent.imr_prompts(trajs, samples, rng)
        valid = [(i, p) for i, p in enumerate(prompts) if p is not None]
        answers = run_imr(engine, [p for _, p in valid], params, self.config.rl.imr_group_size,
                          self.config.agent.answer_tokens)
        for (i, prompt), turns in zip(valid, answers, strict=True):
            groups[i] = ImrGroup(i, prompt, turns, [score(t.text, prompt.label) for t in turns],
                                 self.reward_metric)
        return groups

    def e2e_rewards(self, trajs: list[Trajectory], imr: list[ImrGroup | None]) -> list[float]:
        """R_E(i) = match(i) + lambda / G2 * sum_j R_I(i, j) (IMR off: the match alone)."""
        rl = self.config.rl
        match = [float(t.scores.get(self.reward_metric, 0.0)) for t in trajs]
        recall = [g.matches if g is not None else [0.0] * rl.imr_group_size for g in imr] if rl.imr else None
        return e2e_rewards(match, recall, rl.imr_lambda).tolist()

    def trajectory_rollouts(self, trajs: list[Trajectory], samples: list[dict], rewards: list[float],
                            imr: list[ImrGroup | None]) -> list[Rollout]:
        """The E2E rollouts, with the IMR bonus and the IMR group in their metrics and records."""
        out = []
        for traj, reward, group in zip(trajs, rewards, imr, strict=True):
            metrics = trajectory_metrics(traj, self.reward_metric)
            if self.config.rl.imr:
                metrics.update(imr_bonus=reward - metrics["e2e_match"],
                               imr_prompt_found=float(group is not None))
            imr_record = group.record() if group is not None else None
            out.append(self.trajectory_rollout(traj, samples, reward, metrics, imr=imr_record))
        return out

    def imr_rollouts(self, trajs: list[Trajectory], imr: list[ImrGroup | None],
                     group_size: int) -> list[Rollout]:
        """Every IMR answer is a one-turn rollout in its trajectory's group (member i % G1 of its row)."""
        out = []
        for group in imr:
            if group is None:
                continue
            traj = trajs[group.trajectory]
            group_id = IMR.group_id(traj.sample_id, group.trajectory % group_size)
            for turn, scores in zip(group.turns, group.scores, strict=True):
                match = float(scores[self.reward_metric])
                out.append(Rollout(group_id, match, [turn], IMR,
                                   metrics={"imr_match": match, "imr_sub_em": float(scores["sub_em"])},
                                   record={"sample_id": traj.sample_id, "label": group.prompt.label,
                                           "answer": turn.text}))
        return out

    @classmethod
    def imr_answers(cls, config: Config) -> int:
        return config.rl.imr_group_size if config.rl.imr else 0
