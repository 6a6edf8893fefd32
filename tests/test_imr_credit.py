"""``rl.imr_credit``: broadcast (the paper) gives every turn of a trajectory its advantage; writer credits the
IMR bonus only to the memory turns that wrote the memory the IMR question asked from."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from memtrain.agent.types import Turn
from memtrain.config import ConfigError, load_config
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.models import load_tokenizer
from memtrain.rl.core import writer_credit
from memtrain.rl.rollout import E2E, Rollout, score_groups, training_sequences
from memtrain.rl.tasks.proxy import ProxyTask
from train_helpers import scripted_responder, scripted_rows

AGENT = ["agent.chunk_tokens=12", "agent.max_chunks=4", "agent.memory_tokens=16", "agent.answer_tokens=16"]


def _turns(kinds: list[str]) -> list[Turn]:
    return [Turn(kind=k, step=i, prompt_ids=[1, i], completion_ids=[2], logprobs=[-0.5], text="",
                 hit_cap=False) for i, k in enumerate(kinds)]


def test_writer_credit_by_hand() -> None:
    """Two trajectories of one group, each 2 memory turns + the final turn.

    T1: match 1, IMR bonus 0.5, its IMR question asked memory m_1 (written by turn 1 only).
    T2: match 0, IMR bonus 0, its question asked m_2 (written by turns 1 and 2).
    Match advantages: 1 - 0.5 = +0.5 and -0.5; bonus advantages: 0.5 - 0.25 = +0.25 and -0.25.
    Writer: T1 turns [0.5 + 0.25, 0.5, 0.5], T2 turns [-0.5 - 0.25, -0.5 - 0.25, -0.5].
    Broadcast (the paper): R = 1.5 and 0, A = +0.75 and -0.75 on every turn.
    """
    kinds = ["memory", "memory", "final"]
    t1 = Rollout(E2E.group_id("s"), 1.5, _turns(kinds), E2E, credit=(1.0, [(0.5, 1)]))
    t2 = Rollout(E2E.group_id("s"), 0.0, _turns(kinds), E2E, credit=(0.0, [(0.0, 2)]))
    scored = score_groups([t1, t2], std_norm=False, dynamic_filter=True)
    assert scored.advantages == pytest.approx([0.75, -0.75])  # the trajectory's advantage is unchanged
    advantages = [s.advantage for s in training_sequences(scored)]
    assert advantages == pytest.approx([0.75, 0.5, 0.5, -0.75, -0.75, -0.5])
    broadcast = [Rollout(r.group, r.reward, r.turns, E2E) for r in (t1, t2)]
    seqs = training_sequences(score_groups(broadcast, std_norm=False, dynamic_filter=True))
    assert [s.advantage for s in seqs] == pytest.approx([0.75] * 3 + [-0.75] * 3)


def test_writer_credit_sums_to_the_broadcast_advantage_on_the_writers() -> None:
    assert writer_credit(0.5, [(0.25, 1)], 3) == [0.75, 0.5, 0.5]
    assert writer_credit(0.5, [(0.25, 0)], 3) == [0.5] * 3
    assert writer_credit(0.5, [(0.25, 3)], 3) == [0.75] * 3
    # two IMR prompts (rl.imr_questions=2), asking m_1 and m_3: each part goes to its own writers
    assert writer_credit(0.5, [(0.25, 1), (-0.125, 3)], 4) == [0.625, 0.375, 0.375, 0.5]
    with pytest.raises(ValueError, match="writers=4"):
        writer_credit(0.5, [(0.25, 4)], 3)


def test_the_proxy_task_credits_the_writers_of_the_asked_memory(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    over = [*AGENT, "rl.group_size=2", "rl.imr_group_size=2", "rl.imr_lambda=0.5"]
    runs = {}
    for credit in ("broadcast", "writer"):
        task = ProxyTask(load_config(None, [*over, f"rl.imr_credit={credit}"]), tokenizer)
        engine = ScriptedEngine(scripted_responder, tokenizer)
        runs[credit], _ = task.rollout(scripted_rows(), engine, SamplingParams(temperature=1.0, seed=3), 2,
                                       random.Random(0))
    e2e = {k: [r for r in v if r.kind == E2E] for k, v in runs.items()}
    assert all(r.credit is None for r in e2e["broadcast"])
    a0, a1 = e2e["writer"][:2]  # row A: match 1 + bonus 0.25 and match 0 + bonus 0.25 (test_tasks)
    assert a0.credit[0] == 1.0 and a1.credit[0] == 0.0
    assert [b for b, _ in a0.credit[1]] == pytest.approx([0.25]) == [b for b, _ in a1.credit[1]]
    assert a0.credit[1][0][1] == a0.record["imr"]["step_k"] >= 1
    scored = score_groups(runs["writer"], std_norm=False, dynamic_filter=True)
    seqs = [s for s in training_sequences(scored) if s.group == "A/e2e"]
    # equal bonuses: the bonus parts are 0, so every turn gets the match part (+0.5 / -0.5), as broadcast
    assert [s.advantage for s in seqs] == pytest.approx([0.5] * len(a0.turns) + [-0.5] * len(a1.turns))


def test_imr_credit_is_checked() -> None:
    with pytest.raises(ConfigError, match="imr_credit"):
        load_config(None, ["rl.imr_credit=reader"])


def test_several_imr_questions_per_trajectory(tiny_model_dir: Path) -> None:
    """rl.imr_questions=M: M prompts per trajectory, each its own group of G2 answers (ids ``#q`` for q > 0),
    the bonus lambda times the mean over all M x G2 answers; M = 1 is the paper's single prompt."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    over = [*AGENT, "rl.group_size=2", "rl.imr_group_size=2", "rl.imr_lambda=0.5"]
    results = {}
    for m in (1, 3):
        task = ProxyTask(load_config(None, [*over, f"rl.imr_questions={m}"]), tokenizer)
        engine = ScriptedEngine(scripted_responder, tokenizer)
        results[m], _ = task.rollout(scripted_rows(), engine, SamplingParams(temperature=1.0, seed=3), 2,
                                     random.Random(0))
    one, three = results[1], results[3]
    imr_groups = {r.group for r in three if r.kind != E2E}
    assert {"A/0/imr", "A/0/imr#1", "A/0/imr#2", "A/1/imr", "A/1/imr#1", "A/1/imr#2"} == imr_groups
    assert sum(r.kind != E2E for r in three) == 3 * sum(r.kind != E2E for r in one) == 12
    # the scripted IMR answers match [1, 0] for every prompt: the same mean, so the same bonus as M = 1
    assert [r.reward for r in three if r.kind == E2E] == pytest.approx(
        [r.reward for r in one if r.kind == E2E])
    a0 = next(r for r in three if r.kind == E2E)
    assert len(a0.record["imr_more"]) == 2 and a0.metrics["imr_prompt_found"] == 1.0
    assert ProxyTask.imr_answers(load_config(None, [*over, "rl.imr_questions=3"])) == 6
