"""Rewards as plug-ins: a reward scores one answer text against the gold answers it should match (an E2E
answer against its sample's ``answers``, an IMR answer against the masked entity), ``(answer, golds) ->
float``, registered under a name that ``rl.reward_metric`` chooses. The answer metrics of
:mod:`memtrain.scoring` are registered here: ``strict_em`` (the paper's boxed exact match, the default),
``em``, ``sub_em``, ``f1``, ``span_em`` and ``span_f1`` (the CPU demo's). A new reward is a function in a
file of its own, imported before the run starts::

    from memtrain.rl.rewards import register_reward

    @register_reward("first_word_em")
    def first_word_em(answer: str, golds: Sequence[str]) -> float:
        return float(any(answer.split()[:1] == g.split()[:1] for g in golds))

The memory-agent tasks (``proxy``, ``longqa``) call it for every trajectory and every IMR answer; the
metrics table and plots show it as ``e2e_match`` / ``imr_match``, next to the answer metrics evaluation
reports (``e2e_<metric>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from memtrain.errors import UserError
from memtrain.scoring import METRICS, score

Reward = Callable[[str, Sequence[str]], float]
REWARDS: dict[str, Reward] = {}


def register_reward(name: str) -> Callable[[Reward], Reward]:
    """Register ``fn(answer, golds) -> float`` as the reward ``name`` (refused if another function has it)."""
    def add(fn: Reward) -> Reward:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {REWARDS[name].__module__})")
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str) -> Reward:
    """The reward registered as ``name``; a one-line error naming the registered ones otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        known = ", ".join(sorted(REWARDS))
        raise UserError(f"rl.reward_metric={name!r}: no such reward; registered: {known} "
                        "(memtrain.rl.rewards.register_reward adds one)") from None


def _answer_metric(metric: str) -> Reward:
    def reward(answer: str, golds: Sequence[str]) -> float:
        return float(score(answer, golds)[metric]) if golds else 0.0

    reward.__name__ = reward.__qualname__ = metric
    reward.__doc__ = f"memtrain.scoring's {metric} of the answer against the gold answers (0 without gold)."
    return reward


for _metric in METRICS:
    register_reward(_metric)(_answer_metric(_metric))
