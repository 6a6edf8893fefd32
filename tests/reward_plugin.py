"""A reward defined in a file of its own (imported by tests/test_plugins.py): registration is all it takes."""

from __future__ import annotations

from collections.abc import Sequence

from memtrain.rl.rewards import register_reward


@register_reward("even_letters")
def even_letters(answer: str, golds: Sequence[str]) -> float:
    """The share of the answer's letters at an even alphabet position (a reward the samples of a random-weight
    model differ in, so the update has a gradient); the gold answers are ignored."""
    letters = [c for c in answer.lower() if "a" <= c <= "z"]
    return sum((ord(c) - ord("a")) % 2 == 0 for c in letters) / len(letters) if letters else 0.0
