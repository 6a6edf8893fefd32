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

from memtrain.agent.types import Turn, TurnKind
from memtrain.config import OptimConfig, RLConfig
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_tokenizer
from memtrain.precision import set_compute_dtype
from memtrain.rl.core import e2e_rewards, group_advantages
from memtrain.rl.optim import build_optimizer
from memtrain.rl.rollout import E2E, IMR, Rollout, TrainSequence, score_groups, training_sequences
from memtrain.rl.update import policy_update


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


class Toy:
    """The tiny policy, its engine and the exact probability of writing a digit after a given prompt."""

    def __init__(self, model_dir: Path, lr: float, compute: torch.dtype = torch.float32) -> None:
        torch.manual_seed(0)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        set_compute_dtype(self.model, compute)  # fp32 master weights; bf16: sampling and update autocast
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


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_turn_expected_reward_follows_the_reward_sign(tiny_model_dir: Path, sign: float,
                                                             compute: torch.dtype) -> None:
    """Learning test 1: reward sign * [answer contains a digit]; P(digit) rises for +1 and falls for -1 (with
    fp32 compute and with bf16 compute over fp32 master weights)."""
    toy = Toy(tiny_model_dir, lr=2e-2, compute=compute)
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


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_turn_broadcast_advantage_trains_the_memory_turn(tiny_model_dir: Path,
                                                               compute: torch.dtype) -> None:
    """Learning test 2: P(digit IN THE MEMORY TURN) rises when the memory step gets the broadcast advantage,
    and does not when only the answer turn is trained (the control)."""
    start, end = _two_turn_run(Toy(tiny_model_dir, lr=2e-2, compute=compute), train_memory_turn=True)
    assert start < 0.1 and end > 0.5, (start, end)
    c_start, c_end = _two_turn_run(Toy(tiny_model_dir, lr=2e-2, compute=compute), train_memory_turn=False)
    assert c_start == pytest.approx(start)
    assert c_end < 0.15, (c_start, c_end)


def _turn(kind: TurnKind, prompt: list[int]) -> Turn:
    return Turn(kind=kind, step=prompt[-1], prompt_ids=prompt, completion_ids=[7, 8], logprobs=[-0.1, -0.2],
                text="x", hit_cap=False)


def test_imr_coupling_gives_different_e2e_advantages_by_the_formula() -> None:
    """Learning test 3: with lambda > 0, equal final matches but different IMR recall give different E2E
    advantages, in the direction and by the size the formula gives; through the trainer's own scoring and
    sequence building they reach every step of a trajectory, and every IMR sample gets its own group's."""
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
    # the trainer's path: Rollouts (trajectory i has i + 1 memory turns and a final turn; prompt [i, t]) and
    # per trajectory an IMR group of G2 one-turn samples (prompt [100 + i, j]) -> score_groups -> sequences
    rollouts = [Rollout(E2E.group_id("s0"), float(r), [_turn("memory", [i, t]) for t in range(i + 1)]
                        + [_turn("final", [i, i + 1])], kind=E2E) for i, r in enumerate(rewards.tolist())]
    rollouts += [Rollout(IMR.group_id("s0", i), float(m), [_turn("imr", [100 + i, j])], kind=IMR)
                 for i, row in enumerate(imr) for j, m in enumerate(row)]
    seqs = training_sequences(score_groups(rollouts, std_norm=False, dynamic_filter=True))
    by_prompt = {tuple(s.prompt_ids): s for s in seqs}
    assert len(by_prompt) == len(seqs)
    for i, a in enumerate(adv.tolist()):  # every step of trajectory i (memory turns and answer) gets A_i
        steps = [by_prompt[(i, t)] for t in range(i + 2)]
        assert [s.advantage for s in steps] == pytest.approx([a] * (i + 2))
        assert [s.kind for s in steps] == ["memory"] * (i + 1) + ["final"]
        assert {s.session for s in steps} == {steps[0].session} and {s.group for s in steps} == {"s0/e2e"}
    for i, row in enumerate(imr):  # IMR samples: their own group's Dr. GRPO advantage R_I - mean(R_I)
        if len(set(row)) == 1:  # all-equal group (trajectory 1 recalled nothing): dropped by the DAPO filter
            assert not any((100 + i, j) in by_prompt for j in range(g2))
            continue
        got = [by_prompt[(100 + i, j)].advantage for j in range(g2)]
        assert got == pytest.approx([m - sum(row) / g2 for m in row])
    kept_imr = g2 * sum(len(set(row)) > 1 for row in imr)  # 3 of the 4 IMR groups survive the filter
    assert len({s.session for s in seqs}) == 4 + kept_imr  # one session per trajectory and per IMR sample
    assert len(seqs) == (2 + 3 + 4 + 5) + kept_imr
