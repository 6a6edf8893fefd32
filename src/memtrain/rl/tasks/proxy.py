"""``train.task: proxy`` - the MemTrain proxy objective (docs/method.md sections 2-4).

Per row, G1 memory-agent trajectories reconstruct the masked entity (E2E); per trajectory, one
intermediate-memory-recall prompt (a memory and an earlier chunk with a ``[TARGET]`` entity) is answered G2
times. R_E(i) = match(i) + lambda / G2 * sum_j R_I(i, j); a trajectory with no valid IMR prompt gets no bonus
(counted as ``imr_none``). The E2E group of a row and the IMR group of each trajectory are advantage groups
of their own. Beyond the paper: ``rl.imr_questions`` = M draws M IMR prompts per trajectory (M groups of G2,
the bonus their mean), and ``rl.imr_credit=writer`` credits each prompt's bonus only to the memory turns
that wrote the memory it asked from.
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
    matches: list[float]  # R_I(i, j) for the G2 answers j: the reward of each against the label
    question: int = 0  # which of the trajectory's rl.imr_questions prompts

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
                   params: SamplingParams, rng: random.Random) -> list[list[ImrGroup | None]]:
        """Per trajectory, its ``rl.imr_questions`` IMR prompts (the paper: 1), each answered G2 times and
        scored (None: no valid prompt; an empty list with IMR off). All answers come from one engine call."""
        rl = self.config.rl
        if not rl.imr:
            return [[] for _ in trajs]
        drawn = [agent.imr_prompts(trajs, samples, rng) for _ in range(rl.imr_questions)]  # [question][traj]
        valid = [(q, i, p) for q, prompts in enumerate(drawn) for i, p in enumerate(prompts) if p is not None]
        answers = run_imr(engine, [p for _, _, p in valid], params, rl.imr_group_size,
                          self.config.agent.answer_tokens)
        groups: list[list[ImrGroup | None]] = [[None] * rl.imr_questions for _ in trajs]
        for (q, i, prompt), turns in zip(valid, answers, strict=True):
            groups[i][q] = ImrGroup(i, prompt, turns, [score(t.text, prompt.label) for t in turns],
                                    [float(self.reward(t.text, [prompt.label])) for t in turns], question=q)
        return groups

    def e2e_rewards(self, trajs: list[Trajectory], imr: list[list[ImrGroup | None]]) -> list[float]:
        """R_E(i) = match(i) + lambda / (M G2) * sum over its M IMR prompts and their G2 answers j of R_I
        (the paper: M = 1; IMR off: the match alone). A prompt that could not be drawn counts as 0."""
        rl = self.config.rl
        match = [self.match(t) for t in trajs]
        recall = [[m for g in groups for m in (g.matches if g is not None else [0.0] * rl.imr_group_size)]
                  for groups in imr] if rl.imr else None
        return e2e_rewards(match, recall, rl.imr_lambda).tolist()

    def trajectory_rollouts(self, trajs: list[Trajectory], samples: list[dict], rewards: list[float],
                            imr: list[list[ImrGroup | None]]) -> list[Rollout]:
        """The E2E rollouts, with the IMR bonus and the IMR groups in their metrics and records."""
        out = []
        rl = self.config.rl
        writer = rl.imr and rl.imr_credit == "writer"
        for traj, reward, groups in zip(trajs, rewards, imr, strict=True):
            metrics = trajectory_metrics(traj, self.reward_metric, self.match(traj))
            found = [g for g in groups if g is not None]
            if rl.imr:
                metrics.update(imr_bonus=reward - metrics["e2e_match"],
                               imr_prompt_found=len(found) / rl.imr_questions)
            records = {"imr": found[0].record() if found else None}
            if rl.imr_questions > 1:
                records["imr_more"] = [g.record() for g in found[1:]]
            rollout = self.trajectory_rollout(traj, samples, reward, metrics, **records)
            if writer:  # each prompt's bonus credits the memory turns 1..k that wrote the memory m_k it asked
                scale = rl.imr_lambda / (rl.imr_questions * rl.imr_group_size)
                rollout.credit = (metrics["e2e_match"], [(scale * sum(g.matches), g.prompt.step_k)
                                                        for g in found])
            out.append(rollout)
        return out

    def imr_rollouts(self, trajs: list[Trajectory], imr: list[list[ImrGroup | None]],
                     group_size: int) -> list[Rollout]:
        """Every IMR answer is a one-turn rollout in its prompt's group (a secondary group of member i % G1 of
        its row; the q-th prompt of a trajectory has the id suffix ``#q`` for q > 0)."""
        out = []
        for groups in imr:
            for group in groups:
                if group is None:
                    continue
                traj = trajs[group.trajectory]
                group_id = IMR.group_id(traj.sample_id, group.trajectory % group_size)
                if group.question:
                    group_id += f"#{group.question}"
                for turn, scores, match in zip(group.turns, group.scores, group.matches, strict=True):
                    out.append(Rollout(group_id, match, [turn], IMR,
                                       metrics={"imr_match": match, "imr_sub_em": float(scores["sub_em"])},
                                       record={"sample_id": traj.sample_id, "label": group.prompt.label,
                                               "answer": turn.text}))
        return out

    @classmethod
    def imr_answers(cls, config: Config) -> int:
        return config.rl.imr_questions * config.rl.imr_group_size if config.rl.imr else 0
