"""Learning tests: the trainer really learns (CPU, seconds, fixed seeds).

Rollouts come from the real HFEngine on the tiny checkpoint; success is measured by EXACT probabilities from
the model (not sampled rewards), so the assertions are not at the mercy of sampling noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from memtrain.config import OptimConfig, RLConfig
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_tokenizer
from memtrain.rl.core import e2e_rewards, group_advantages
from memtrain.rl.optim import build_optimizer
from memtrain.rl.update import TrainSequence, policy_update


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


class Toy:
    """The tiny policy, its engine and the exact probability of writing a digit after a given prompt."""

    def __init__(self, model_dir: Path, lr: float) -> None:
        torch.manual_seed(0)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.engine = HFEngine(self.model, self.tokenizer)
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=0))
        vocab = range(len(self.tokenizer))
        self.digit_ids = torch.tensor([i for i in vocab if _has_digit(self.tokenizer.decode([i],
                                                                                          skip_special_tokens=True))])
        assert 10 <= len(self.digit_ids) < len(self.tokenizer) // 4

    def chat(self, content: str) -> list[int]:
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True)["input_ids"])

    def p_digit(self, prompt_ids: list[int]) -> float:
        """Exact expected reward: P(the one-token answer contains a digit | prompt)."""
        with torch.no_grad():
            probs = self.model(torch.tensor([prompt_ids])).logits[0, -1].float().softmax(-1)
        return float(probs[self.digit_ids].sum())

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[Completion]]:
        params = SamplingParams(n=n, temperature=1.0, max_tokens=1, seed=seed)
        return self.engine.generate([GenerationRequest(p, params) for p in prompts])

    def update(self, seqs: list[TrainSequence]) -> dict[str, Any]:
        stats = policy_update(self.model, self.optimizer, seqs, RLConfig(kl_coef=0.0))
        assert stats["skipped_nonfinite"] == 0.0
        assert stats["old_logprob_source"] == "sampler"  # the engine's log-probs were verified and reused
        return stats


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_turn_expected_reward_follows_the_reward_sign(tiny_model_dir: Path, sign: float) -> None:
    """Learning test 1: reward sign * [answer contains a digit]; P(digit) rises for +1 and falls for -1."""
    toy = Toy(tiny_model_dir, lr=2e-2)
    prompt = toy.chat("Say a number.")
    start = toy.p_digit(prompt)
    for step in range(12):
        completions = toy.sample([prompt], n=32, seed=step)[0]
        rewards = torch.tensor([[sign * _has_digit(c.text) for c in completions]])
        adv = group_advantages(rewards)[0].tolist()
        toy.update([TrainSequence(prompt, c.token_ids, a, c.logprobs, kind="final", group="q")
                    for c, a in zip(completions, adv, strict=True)])
    end = toy.p_digit(prompt)
    if sign > 0:
        assert start < 0.1 and end > 0.5, (start, end)
    else:
        assert end < start / 3, (start, end)


def _two_turn_run(toy: Toy, train_memory_turn: bool, steps: int = 12, group: int = 32) -> tuple[float, float]:
    """Memory turn writes one token; the final turn sees it. Right iff the memory holds a digit."""
    mem_prompt = toy.chat("Read the chunk and write the new memory.")
    start = toy.p_digit(mem_prompt)
    for step in range(steps):
        memories = toy.sample([mem_prompt], n=group, seed=step)[0]
        final_prompts = [toy.chat(f"Memory: {m.text}\nWhich number was in the document?") for m in memories]
        answers = [cs[0] for cs in toy.sample(final_prompts, n=1, seed=1000 + step)]
        # the final answer can only be right if the memory step wrote the number down
        rewards = torch.tensor([[float(_has_digit(m.text)) for m in memories]])
        adv = group_advantages(rewards)[0].tolist()
        seqs = []
        for m, fp, ans, a in zip(memories, final_prompts, answers, adv, strict=True):
            if train_memory_turn:  # the trajectory advantage, broadcast to its memory step
                seqs.append(TrainSequence(mem_prompt, m.token_ids, a, m.logprobs, kind="memory", group="s"))
            seqs.append(TrainSequence(fp, ans.token_ids, a, ans.logprobs, kind="final", group="s"))
        toy.update(seqs)
    return start, toy.p_digit(mem_prompt)


def test_multi_turn_broadcast_advantage_trains_the_memory_turn(tiny_model_dir: Path) -> None:
    """Learning test 2: P(digit IN THE MEMORY TURN) rises when the memory step gets the broadcast advantage,
    and does not when only the answer turn is trained (the control)."""
    start, end = _two_turn_run(Toy(tiny_model_dir, lr=2e-2), train_memory_turn=True)
    assert start < 0.1 and end > 0.5, (start, end)
    c_start, c_end = _two_turn_run(Toy(tiny_model_dir, lr=2e-2), train_memory_turn=False)
    assert c_start == pytest.approx(start)
    assert c_end < 0.15, (c_start, c_end)


def test_imr_coupling_gives_different_e2e_advantages_by_the_formula() -> None:
    """Learning test 3: with lambda > 0, equal final matches but different IMR recall give different E2E
    advantages, in the direction and by the size the formula gives; they reach every step of a trajectory."""
    g2, lam = 4, 0.5
    match = [1.0, 1.0, 0.0, 0.0]
    imr = [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    rewards = e2e_rewards(match, imr, lam)
    assert rewards.tolist() == pytest.approx([1.375, 1.0, 0.125, 0.125])
    adv = group_advantages(rewards[None])[0]
    mean = (1.375 + 1.0 + 0.125 + 0.125) / 4
    assert adv.tolist() == pytest.approx([1.375 - mean, 1.0 - mean, 0.125 - mean, 0.125 - mean])
    # trajectories 0 and 1 have the same final match; 0 recalled 3 more IMR entities out of G2
    assert float(adv[0] - adv[1]) == pytest.approx(lam / g2 * 3)
    # without the coupling (lambda = 0, the "decoupled" ablation) they are indistinguishable
    adv0 = group_advantages(e2e_rewards(match, imr, 0.0)[None])[0]
    assert float(adv0[0]) == float(adv0[1])
    # the advantage is broadcast to every step (memory steps and final answer) of each trajectory
    kinds = ("memory", "memory", "final")
    steps = [[TrainSequence([1, 2], [3], float(a), kind=k, group="sample0") for k in kinds] for a in adv]
    assert [{s.advantage for s in traj} for traj in steps] == [{float(a)} for a in adv]
