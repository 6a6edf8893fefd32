"""Collapse shows in the metrics: cap-hit rates, the sampled tokens' entropy, steps without a kept group."""

from __future__ import annotations

import pytest

from memtrain.agent.types import Turn
from memtrain.rl.metrics import COLLAPSE_FLAGS, collapse_flags, summary_table
from memtrain.rl.rollout import E2E, IMR, Rollout, score_groups, step_metrics


def _turn(kind: str, cap: bool, logprobs: list[float]) -> Turn:
    return Turn(kind=kind, step=0, prompt_ids=[1], completion_ids=[2] * len(logprobs), logprobs=logprobs,
                text="", hit_cap=cap)


def test_step_metrics_report_cap_rates_and_the_entropy_estimate() -> None:
    rollouts = [
        Rollout(E2E.group_id("s"), 1.0, [_turn("memory", True, [-1.0, -2.0]), _turn("final", True, [-3.0])],
                E2E),
        Rollout(E2E.group_id("s"), 0.0, [_turn("memory", False, [-1.0]), _turn("final", False, [-1.0])], E2E),
        Rollout(IMR.group_id("s", 0), 0.0, [_turn("imr", True, [-2.0])], IMR),
    ]
    row = step_metrics(score_groups(rollouts, std_norm=False, dynamic_filter=True), {})
    assert row["memory_cap_rate"] == 0.5
    assert row["answer_cap_rate"] == pytest.approx(2 / 3)  # final and IMR turns are answers
    assert row["sample_entropy"] == pytest.approx(10 / 6)  # mean -log p over the 6 sampled tokens
    assert row["kept_groups"] == 1.0 and row["groups"] == 2.0  # the IMR group of one member is filtered


def test_collapse_flags() -> None:
    quiet = {"kept_groups": 2.0, "memory_cap_rate": 0.5, "answer_cap_rate": 0.2}
    dead = {"kept_groups": 0.0, "memory_cap_rate": 0.5, "answer_cap_rate": 0.2}
    assert collapse_flags([quiet, dead, dead], 3) == {}
    assert collapse_flags([dead, dead, dead], 3) == {"warn_no_signal": 1.0}
    assert collapse_flags([dead, dead], 3) == {}  # fewer steps than the patience: not yet
    capped = {**quiet, "memory_cap_rate": 1.0, "answer_cap_rate": 1.0}
    assert collapse_flags([capped], 3) == {"warn_memory_cap": 1.0, "warn_answer_cap": 1.0}
    assert collapse_flags([], 3) == {}


def test_the_summary_table_shows_the_collapse_columns() -> None:
    rows = [{"step": 1, "kept_groups": 0.0, "memory_cap_rate": 1.0, "answer_cap_rate": 1.0,
             "sample_entropy": 0.5, "warn_memory_cap": 1.0}]
    header = summary_table(rows).splitlines()[0].split()
    wanted = {"kept_groups", "memory_cap_rate", "answer_cap_rate", "sample_entropy", "warn_memory_cap"}
    assert wanted <= set(header)
    assert set(COLLAPSE_FLAGS) == {"warn_no_signal", "warn_memory_cap", "warn_answer_cap"}
