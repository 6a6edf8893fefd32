"""The policy update on a real tiny checkpoint: log-prob alignment, micro-batch equivalence, old/ref
log-probs, non-finite handling, clipping, scheduler and LoRA."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from memtrain.config import ConfigError, LoraConfig, OptimConfig, RLConfig
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_tokenizer
from memtrain.rl.logprobs import (
    MIN_SHARED_PREFIX,
    plan_micro_batches,
    plan_update,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)
from memtrain.rl.optim import apply_lora, build_optimizer, build_scheduler, warmup_constant
from memtrain.rl.rollout import TrainSequence
from memtrain.rl.update import accumulate_policy_gradients, policy_update


def _load(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


# sessions of different sizes: trajectories of 3 and 2 turns, then sequences of their own (IMR samples)
SESSIONS = ("t0", "t0", "t0", "t1", "t1", None, None)


def _random_seqs(n: int, seed: int, vocab: int = 500) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 14))]
        completion = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        out.append(TrainSequence(prompt, completion, advantage=rng.uniform(-1.5, 1.5),
                                 kind=("memory", "final", "imr")[i % 3], group=f"g{i % 4}",
                                 session=SESSIONS[i % len(SESSIONS)]))
    return out


def _unpadded_logprobs(model: Any, seq: TrainSequence, temperature: float = 1.0) -> list[float]:
    """Reference: one unpadded forward over prompt + completion, log-softmax over the full logits / T."""
    with torch.no_grad():
        ids = torch.tensor([seq.prompt_ids + seq.completion_ids])
        logp = (model(ids).logits[0].float() / temperature).log_softmax(-1)
    p = len(seq.prompt_ids)
    return [float(logp[p - 1 + j, t]) for j, t in enumerate(seq.completion_ids)]


def _grads(model: Any) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


# --- TrainSequence and micro-batch planning ---------------------------------------------------------------

def test_train_sequence_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="completion_ids is empty"):
        TrainSequence([1, 2], [], 1.0, group="s0")
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        TrainSequence([], [1], 1.0)
    with pytest.raises(ValueError, match="old_logprobs has 1 values for 2 completion tokens"):
        TrainSequence([1], [2, 3], 1.0, old_logprobs=[-0.1])
    with pytest.raises(ValueError, match="kind 'answer'"):
        TrainSequence([1], [2], 1.0, kind="answer")
    with pytest.raises(ValueError, match="advantage must be finite"):
        TrainSequence([1], [2], math.nan)
    assert TrainSequence([1, 2], [3], 0.0).length == 3


def test_plan_micro_batches_respects_the_padded_budget() -> None:
    assert plan_micro_batches([5, 3, 8, 2], 10) == [[2], [0, 1], [3]]
    lengths = [random.Random(3).randint(1, 40) for _ in range(57)]
    plan = plan_micro_batches(lengths, 64)
    assert sorted(i for mb in plan for i in mb) == list(range(57))
    for mb in plan:
        assert len(mb) * max(lengths[i] for i in mb) <= 64
    assert plan_micro_batches([100, 3], 50) == [[0], [1]]  # over-budget sequence alone, not dropped
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([1], 0)


def test_plan_update_runs_a_repeated_prompt_once() -> None:
    a, b, c = [1, 2, 3, 4], [5, 6], [7, 8, 9]
    prompts = [a, b, a, c, a, b, a]
    completions = [3, 2, 5, 4, 1, 2, 2]
    plan = plan_update(prompts, completions, max_tokens=100)
    assert sorted(i for m in plan for i in m.rows) == list(range(7))
    shared = {tuple(m.rows): m.shared for m in plan if m.shared}
    assert shared == {(2, 0, 6, 4): 4, (1, 5): 2}  # longest completion first; c has no repeat
    assert [m.rows for m in plan if not m.shared] == [[3]]
    # budget: prompt once + rows x longest completion; a group split down to one row goes to the padded plan
    tight = plan_update(prompts, completions, max_tokens=4 + 2 * 5)
    assert [m.rows for m in tight if m.shared] == [[2, 0], [6, 4], [1, 5]]
    assert [m.rows for m in plan_update([a, a], [9, 9], max_tokens=4 + 9)] == [[0], [1]]  # no room for two
    off = plan_update(prompts, completions, max_tokens=100, share_prompts=False)
    lengths = [len(p) + n for p, n in zip(prompts, completions, strict=True)]
    assert [(m.rows, m.shared) for m in off] == [(r, 0) for r in plan_micro_batches(lengths, 100)]


def test_plan_update_runs_a_shared_template_prefix_once() -> None:
    """Prompts that differ but share MIN_SHARED_PREFIX+ leading tokens (a template's instructions) run
    their common prefix once; a shorter common part (a system prompt) is not shared."""
    system = [1] * 20                                   # shorter than MIN_SHARED_PREFIX on its own
    memory = system + [2] * (MIN_SHARED_PREFIX + 10)    # one template ...
    final = system + [3] * (MIN_SHARED_PREFIX + 10)     # ... and another after the same system prompt
    prompts = [[*memory, 7, 8], [*final, 9], [*memory, 5], [*memory, 5, 6, 6], [*final, 4, 4], [*system, 9]]
    completions = [3, 2, 1, 2, 2, 2]
    plan = plan_update(prompts, completions, max_tokens=10_000)
    assert sorted(i for m in plan for i in m.rows) == list(range(6))
    assert {tuple(m.rows): m.shared for m in plan} == {(0, 3, 2): len(memory), (4, 1): len(final), (5,): 0}
    # budget: the prefix once + rows x the longest remainder (rows 0 and 3: 5 tokens after the prefix)
    p = len(memory)
    tight = plan_update(prompts, completions, max_tokens=p + 2 * 5)
    assert {tuple(m.rows): m.shared for m in tight if m.rows[0] in (0, 2)} == {(0, 3): p, (2,): 0}


def _shared_prompt_seqs(seed: int) -> list[TrainSequence]:
    """IMR-like groups (one prompt, several sampled answers of different lengths) and memory-turn-like
    prompts that share a template prefix, among lone sequences."""
    rng = random.Random(seed)
    seqs = _random_seqs(4, seed=seed)
    template = [rng.randrange(3, 500) for _ in range(MIN_SHARED_PREFIX + 4)]
    for _ in range(3):
        prompt = template + [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))]
        completion = [rng.randrange(3, 500) for _ in range(rng.randint(1, 8))]
        seqs.append(TrainSequence(prompt, completion, rng.uniform(-1.5, 1.5), kind="memory", group="m"))
    for g in range(3):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(6, 16))]
        for _ in range(rng.randint(2, 5)):
            completion = [rng.randrange(3, 500) for _ in range(rng.randint(1, 8))]
            seqs.append(TrainSequence(prompt, completion, rng.uniform(-1.5, 1.5), kind="imr", group=f"i{g}"))
    rng.shuffle(seqs)
    return seqs


# --- log-probs -------------------------------------------------------------------------------------------

def test_sequence_logprobs_match_unpadded_forward_for_any_micro_batching(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    seqs = _random_seqs(7, seed=1)
    expected = [_unpadded_logprobs(model, s) for s in seqs]
    for budget in (1, 40, 10_000):
        got = sequence_logprobs(model, seqs, budget)
        for g, e, s in zip(got, expected, seqs, strict=True):
            assert g.dtype == torch.float32 and g.shape == (len(s.completion_ids),)
            torch.testing.assert_close(g, torch.tensor(e), atol=2e-5, rtol=0)
    hot = sequence_logprobs(model, seqs[:1], 100, temperature=2.0)[0]
    with torch.no_grad():
        s = seqs[0]
        logits = model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0] / 2.0
        p = len(s.prompt_ids)
        ref = [float(logits.log_softmax(-1)[p - 1 + j, t]) for j, t in enumerate(s.completion_ids)]
    torch.testing.assert_close(hot, torch.tensor(ref), atol=2e-5, rtol=0)


def test_shared_prompt_passes_give_the_padded_forward_logprobs(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    seqs = _shared_prompt_seqs(seed=6)
    for budget in (30, 10_000):
        for got, s in zip(sequence_logprobs(model, seqs, budget, temperature=0.7), seqs, strict=True):
            want = torch.tensor(_unpadded_logprobs(model, s, 0.7))
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_a_loaded_model_computes_exactly_as_its_copy(tiny_model_dir: Path) -> None:
    """load_policy leaves no weight at an unaligned address in the safetensors memory map, where CPU kernels
    may round differently: a reloaded reference or resumed policy must compute what the original did."""
    import copy

    from memtrain.models import load_policy

    loaded = load_policy(str(tiny_model_dir), "float32", "cpu")
    assert all(t.data_ptr() % 64 == 0 for t in (*loaded.parameters(), *loaded.buffers()) if t.numel())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    twin = copy.deepcopy(loaded)
    seqs = _shared_prompt_seqs(seed=9)
    theirs = sequence_logprobs(twin, seqs, 10_000)
    for a, b in zip(sequence_logprobs(loaded, seqs, 10_000), theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_passes_give_the_padded_gradient(tiny_model_dir: Path, lora: bool) -> None:
    """rl.share_prompts changes how the batch is computed, not the loss or its gradient (with the KL term:
    a frozen reference, or the LoRA policy with its adapters off)."""
    torch.manual_seed(0)
    model = _load(tiny_model_dir)
    ref = None
    if lora:
        model = apply_lora(model, LoraConfig(rank=4, alpha=8))
        with torch.no_grad():  # non-zero adapters, so the policy differs from its reference
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
    else:
        ref = _load(tiny_model_dir)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
    seqs = _shared_prompt_seqs(seed=7)
    gen = torch.Generator().manual_seed(8)
    for s, lp in zip(seqs, sequence_logprobs(model, seqs, 10_000), strict=True):
        s.old_logprobs = (lp + 0.8 * (torch.rand(lp.shape, generator=gen) - 0.5)).tolist()
    cfg = RLConfig(kl_coef=0.1, temperature=0.8, micro_batch_tokens=10_000, old_logprobs="sampler")
    unshared = cfg.model_copy(update={"share_prompts": False})
    padded = accumulate_policy_gradients(model, seqs, unshared, ref=ref)
    g_padded = _grads(model)
    model.zero_grad(set_to_none=True)
    shared = accumulate_policy_gradients(model, seqs, cfg, ref=ref)
    g_shared = _grads(model)
    # 3 IMR groups + the template family + the rest
    assert padded["num_micro_batches"] == 1 and shared["num_micro_batches"] == 5
    assert padded["clip_frac"] > 0 and padded["kl"] > 0
    assert shared["loss"] == pytest.approx(padded["loss"], rel=1e-5, abs=1e-7)
    assert shared["kl"] == pytest.approx(padded["kl"], rel=1e-5)
    assert sum(float(g.abs().sum()) for g in g_padded) > 0
    for a, b in zip(g_padded, g_shared, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_a_padded_micro_batch_gives_the_gradient_of_its_sequences_run_alone(tiny_model_dir: Path) -> None:
    """Padding changes nothing: the loss and gradient of one micro-batch of rows of different lengths equal
    those of every row in a pass of its own, where nothing is padded."""
    model = _load(tiny_model_dir)
    seqs = _random_seqs(6, seed=11)
    for s, lp in zip(seqs, sequence_logprobs(model, seqs, 10_000), strict=True):
        s.old_logprobs = (lp - 0.1).tolist()  # ratios away from 1, so the clip is exercised too
    cfg = RLConfig(kl_coef=0.0, micro_batch_tokens=10_000, old_logprobs="sampler", share_prompts=False)
    together = accumulate_policy_gradients(model, seqs, cfg)
    g_together = _grads(model)
    model.zero_grad(set_to_none=True)
    alone = accumulate_policy_gradients(model, seqs, cfg.model_copy(update={"micro_batch_tokens": 1}))
    g_alone = _grads(model)
    assert together["num_micro_batches"] == 1 and alone["num_micro_batches"] == len(seqs)
    assert len({len(s.prompt_ids) + len(s.completion_ids) for s in seqs}) > 1  # the batch is padded
    assert together["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert sum(float(g.abs().sum()) for g in g_alone) > 0
    for a, b in zip(g_alone, g_together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_entropy_matches_softmax_definition(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    seqs = _random_seqs(3, seed=2)
    _, ents = sequence_logprobs_and_entropy(model, seqs, 10_000)
    s = seqs[1]
    with torch.no_grad():
        logp = model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].log_softmax(-1)
    p = len(s.prompt_ids)
    rows = logp[p - 1: p - 1 + len(s.completion_ids)]
    torch.testing.assert_close(ents[1], -(rows.exp() * rows).sum(-1), atol=1e-4, rtol=0)


def test_bf16_model_gives_float32_logprobs_close_to_fp32(tiny_model_dir: Path) -> None:
    seqs = _random_seqs(3, seed=3)
    lp32 = sequence_logprobs(_load(tiny_model_dir), seqs, 10_000)
    lp16 = sequence_logprobs(_load(tiny_model_dir, torch.bfloat16), seqs, 10_000)
    for a, b in zip(lp32, lp16, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.1, rtol=0)


# --- gradient accumulation equivalence and the loss value ---------------------------------------------

@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "session_mean"])
def test_micro_batch_accumulation_equals_full_batch_gradient(tiny_model_dir: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = _load(tiny_model_dir)
    ref = _load(tiny_model_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seqs = _random_seqs(9, seed=4)
    gen = torch.Generator().manual_seed(5)
    for s, lp in zip(seqs, sequence_logprobs(model, seqs, 10_000), strict=True):
        s.old_logprobs = (lp + 0.8 * (torch.rand(lp.shape, generator=gen) - 0.5)).tolist()  # ratios 0.67..1.5
    full_cfg = RLConfig(kl_coef=0.1, loss_agg=mode, micro_batch_tokens=100_000, old_logprobs="sampler")
    micro_cfg = full_cfg.model_copy(update={"micro_batch_tokens": 30})

    full = accumulate_policy_gradients(model, seqs, full_cfg, ref=ref)
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = accumulate_policy_gradients(model, seqs, micro_cfg, ref=ref)
    g_micro = _grads(model)

    assert full["num_micro_batches"] == 1 and micro["num_micro_batches"] >= 4
    assert full["clip_frac"] > 0 and full["kl"] > 0  # clipping and KL both take part
    assert micro["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-7)
    assert micro["kl"] == pytest.approx(full["kl"], rel=1e-5)
    assert micro["clip_frac"] == pytest.approx(full["clip_frac"])
    assert sum(float(g.abs().sum()) for g in g_full) > 0
    for a, b in zip(g_full, g_micro, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "session_mean"])
def test_zero_advantage_sequences_are_skipped_with_the_same_gradient(tiny_model_dir: Path, mode: str) -> None:
    """Without a KL term a sequence of advantage 0 cannot change the gradient: its pass is left out, the
    loss's normalisation still counts it, and the gradient is the one of the full batch."""
    torch.manual_seed(0)
    model = _load(tiny_model_dir)
    seqs = _random_seqs(9, seed=4)
    for i, s in enumerate(seqs):
        if i % 3 == 0:
            s.advantage = 0.0
        s.session = f"t{i // 2}"  # sessions mix trained and skipped sequences
    cfg = RLConfig(kl_coef=0.0, loss_agg=mode, micro_batch_tokens=60, old_logprobs="recompute")
    every = accumulate_policy_gradients(model, seqs, cfg, skip_zero_adv=False)
    g_every = _grads(model)
    model.zero_grad(set_to_none=True)
    skipped = accumulate_policy_gradients(model, seqs, cfg)
    g_skipped = _grads(model)
    assert skipped["num_seqs_zero_adv_skipped"] == 3 and skipped["num_seqs"] == 6 and every["num_seqs"] == 9
    assert skipped["loss"] == pytest.approx(every["loss"], rel=1e-5, abs=1e-7)
    assert sum(float(g.abs().sum()) for g in g_every) > 0
    for a, b in zip(g_every, g_skipped, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    with_kl = cfg.model_copy(update={"kl_coef": 0.1})
    kl = accumulate_policy_gradients(model, seqs, with_kl, ref=_load(tiny_model_dir))
    assert kl["num_seqs_zero_adv_skipped"] == 0  # with a KL term every sequence's pass counts


@pytest.mark.parametrize("tis_cap", [None, 2.0])
def test_auto_old_logprobs_give_the_same_gradient_for_any_micro_batch_plan(tiny_model_dir: Path,
                                                                           tis_cap: float | None) -> None:
    """rl.old_logprobs=auto decides per sequence (sampler's within the tolerance, else recomputed), so which
    sequences share a micro-batch cannot change the gradient (it once decided per micro-batch)."""
    torch.manual_seed(0)
    model = _load(tiny_model_dir)
    seqs = _random_seqs(8, seed=4)
    gen = torch.Generator().manual_seed(5)
    for i, (s, lp) in enumerate(zip(seqs, sequence_logprobs(model, seqs, 10_000), strict=True)):
        noise = 0.01 if i % 2 else 0.8  # odd sequences within old_logprob_tol, even ones far off it
        s.old_logprobs = (lp + noise * (torch.rand(lp.shape, generator=gen) - 0.5)).tolist()
    full_cfg = RLConfig(kl_coef=0.0, micro_batch_tokens=100_000, old_logprobs="auto", old_logprob_tol=0.05,
                        share_prompts=False, tis_cap=tis_cap)
    full = accumulate_policy_gradients(model, seqs, full_cfg)
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = accumulate_policy_gradients(model, seqs, full_cfg.model_copy(update={"micro_batch_tokens": 30}))
    g_micro = _grads(model)
    assert full["num_micro_batches"] == 1 and micro["num_micro_batches"] >= 4
    assert full["old_logprob_sampler_frac"] == micro["old_logprob_sampler_frac"] == 0.5
    assert micro["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-7)
    assert sum(float(g.abs().sum()) for g in g_full) > 0
    for a, b in zip(g_full, g_micro, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("mode", "temperature"), [("seq_mean_token_mean", 1.0), ("token_mean", 1.0),
                                                     ("seq_mean_token_mean", 0.7), ("session_mean", 0.7)])
def test_update_loss_equals_hand_computation(tiny_model_dir: Path, mode: str, temperature: float) -> None:
    """The reported loss equals pg + kl_coef * k3 written out per token in plain Python; at temperature T the
    policy AND the reference log-probs are those of softmax(logits / T) (as verl)."""
    model = _load(tiny_model_dir)
    ref = _load(tiny_model_dir)
    with torch.no_grad():
        ref.model.norm.weight.mul_(1.3)
    seqs = _random_seqs(4, seed=6)  # sessions t0 t0 t0 t1: a 3-turn and a 1-turn trajectory
    rng = random.Random(7)
    for s in seqs:
        s.old_logprobs = [lp + rng.uniform(-0.3, 0.3) for lp in _unpadded_logprobs(model, s, temperature)]
    cur = [_unpadded_logprobs(model, s, temperature) for s in seqs]
    refs = [_unpadded_logprobs(ref, s, temperature) for s in seqs]
    kl_coef, eps = 0.05, 0.2
    per_seq, tokens = [], []
    for s, lps, rlps in zip(seqs, cur, refs, strict=True):
        terms = []
        assert s.old_logprobs is not None
        for lp, old, rlp in zip(lps, s.old_logprobs, rlps, strict=True):
            r = math.exp(lp - old)
            pg = max(-s.advantage * r, -s.advantage * min(max(r, 1 - eps), 1 + eps))
            d = rlp - lp
            terms.append(pg + kl_coef * (math.exp(d) - d - 1))
        per_seq.append(sum(terms) / len(terms))
        tokens.extend(terms)
    expected = {"seq_mean_token_mean": sum(per_seq) / len(per_seq), "token_mean": sum(tokens) / len(tokens),
                "session_mean": (sum(per_seq[:3]) / 3 + per_seq[3]) / 2}[mode]
    cfg = RLConfig(kl_coef=kl_coef, loss_agg=mode, old_logprobs="sampler", micro_batch_tokens=40,
                   temperature=temperature)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = policy_update(model, opt, seqs, cfg, ref=ref)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["old_logprob_source"] == "sampler"


# --- old log-probs: the sampler's (verified) or recomputed --------------------------------------------

def _engine_seqs(model: Any, tokenizer: Any, temperature: float = 1.0) -> list[TrainSequence]:
    """Sequences sampled by the real HFEngine: chat-template prompts, the engine's own log-probs."""
    engine = HFEngine(model, tokenizer)
    prompts = ["Read the next chunk.", "Which entity does [MASK] stand for in the long article?"]
    reqs = [GenerationRequest(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                            add_generation_prompt=True)["input_ids"],
                              SamplingParams(n=3, temperature=temperature, max_tokens=10, seed=11))
            for p in prompts]
    outs = engine.generate(reqs)
    return [TrainSequence(r.prompt_ids, c.token_ids, 0.3 * (j - 1), c.logprobs, kind="final", group=f"q{i}")
            for i, (r, cs) in enumerate(zip(reqs, outs, strict=True)) for j, c in enumerate(cs)]


def test_old_logprobs_sampler_verified_recomputed_or_mixed(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = _load(tiny_model_dir)
    seqs = _engine_seqs(model, tokenizer)
    for s in seqs:  # no advantage of 0: every sequence is trained on (none skipped)
        s.advantage += 0.05
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays as sampled
    # one micro-batch for all (the engine's samples share prompts, which would otherwise run apart)
    cfg = RLConfig(kl_coef=0.0, micro_batch_tokens=100_000, share_prompts=False)

    st = policy_update(model, opt, seqs, cfg)
    # the engine's log-probs are on exactly the tokens the trainer scores: they agree to float precision
    assert st["old_logprob_source"] == "sampler" and st["old_logprob_sampler_frac"] == 1.0
    assert st["old_logprob_max_diff"] < 1e-4

    seqs[0].old_logprobs = [lp - 0.5 for lp in seqs[0].old_logprobs or []]
    st = policy_update(model, opt, seqs, cfg)  # decided per sequence: only the bad one is recomputed
    assert st["old_logprob_source"] == "mixed"
    assert st["old_logprob_sampler_frac"] == pytest.approx(5 / 6)
    assert st["old_logprob_max_diff"] == pytest.approx(0.5, abs=1e-3)
    assert st["ratio_max"] == pytest.approx(1.0, abs=1e-3) and st["ratio_min"] == pytest.approx(1.0, abs=1e-3)

    st = policy_update(model, opt, seqs, cfg.model_copy(update={"micro_batch_tokens": 1}))  # same, apart
    assert st["old_logprob_source"] == "mixed"
    assert st["old_logprob_sampler_frac"] == pytest.approx(5 / 6)

    st = policy_update(model, opt, seqs, cfg.model_copy(update={"old_logprobs": "sampler"}))
    assert st["old_logprob_source"] == "sampler"
    assert st["ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-3)  # the stale values are used as told

    st = policy_update(model, opt, seqs, cfg.model_copy(update={"old_logprobs": "recompute"}))
    assert st["old_logprob_source"] == "recomputed" and st["clip_frac"] == 0.0

    seqs[1].old_logprobs = None
    st = policy_update(model, opt, seqs, cfg)
    assert st["old_logprob_source"] == "recomputed"
    with pytest.raises(ValueError, match="old_logprobs='sampler' but 1 sequence"):
        policy_update(model, opt, seqs, cfg.model_copy(update={"old_logprobs": "sampler"}))


def test_first_update_at_temperature_uses_the_tempered_distribution(tiny_model_dir: Path) -> None:
    """rl.temperature=0.7 on tokens the engine sampled at 0.7: the engine's log-probs are verified and reused,
    the ratio is exactly 1 on the first update, and the update's entropy is that of softmax(logits / 0.7)."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = _load(tiny_model_dir)
    seqs = _engine_seqs(model, tokenizer, temperature=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = RLConfig(kl_coef=0.0, temperature=0.7, micro_batch_tokens=100_000)
    st = policy_update(model, opt, seqs, cfg)
    assert st["old_logprob_source"] == "sampler" and st["old_logprob_max_diff"] < 1e-4
    assert st["ratio_min"] == pytest.approx(1.0, abs=1e-4) and st["ratio_max"] == pytest.approx(1.0, abs=1e-4)
    _, ents = sequence_logprobs_and_entropy(model, seqs, 10_000, temperature=0.7)
    tempered_entropy = sum(float(e.sum()) for e in ents) / sum(len(e) for e in ents)
    assert st["entropy"] == pytest.approx(tempered_entropy, rel=1e-4)
    _, raw = sequence_logprobs_and_entropy(model, seqs, 10_000)
    assert abs(tempered_entropy - sum(float(e.sum()) for e in raw) / sum(len(e) for e in raw)) > 1e-2
    # a trainer scoring the raw logits (T = 1, the old convention) sees other numbers: 'auto' notices
    st = policy_update(model, opt, seqs, cfg.model_copy(update={"temperature": 1.0}))
    assert st["old_logprob_source"] == "recomputed" and st["old_logprob_max_diff"] > cfg.old_logprob_tol


def test_top_p_below_one_is_refused_for_training(tiny_model_dir: Path) -> None:
    """The update cannot recompute a top-p nucleus: training with rl.top_p < 1 stops with a config error."""
    model = _load(tiny_model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ConfigError, match=r"^rl\.top_p=0\.9: training needs rl\.top_p=1\.0"):
        policy_update(model, opt, _random_seqs(2, seed=1), RLConfig(kl_coef=0.0, top_p=0.9))


# --- the optimizer step: non-finite, clipping, scheduler, empty batches -------------------------------

def test_nonfinite_loss_skips_the_step_and_zeroes_grads(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, warmup_steps=5)
    stats = policy_update(model, opt, _random_seqs(4, seed=8), RLConfig(kl_coef=0.0), scheduler=sched)
    assert stats["skipped_nonfinite"] == 1.0 and math.isnan(float(stats["loss"]))
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0 and sched.last_epoch == 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], equal_nan=True, rtol=0, atol=0)


def test_grad_clip_bounds_the_step_and_reports_the_unclipped_norm(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = policy_update(model, opt, _random_seqs(5, seed=9), RLConfig(kl_coef=0.0), grad_clip=1e-3)
    assert float(stats["grad_norm"]) > 1e-3
    pairs = zip(model.parameters(), before, strict=True)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in pairs))
    assert float(delta) == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the step IS the clipped gradient


def test_scheduler_warms_up_then_stays_constant_and_resumes(tiny_model_dir: Path) -> None:
    assert [warmup_constant(4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_constant(0)(0) == 1.0
    model = _load(tiny_model_dir)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=2))
    sched = build_scheduler(opt, 2)
    seqs = _random_seqs(3, seed=10)
    lrs = [policy_update(model, opt, seqs, RLConfig(kl_coef=0.0), scheduler=sched)["lr"] for _ in range(3)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])
    opt2 = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=2))
    sched2 = build_scheduler(opt2, 2)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx([1e-3])


def test_empty_batch_and_missing_reference_are_handled(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    opt = build_optimizer(model, OptimConfig())
    stats = policy_update(model, opt, [], RLConfig())
    assert stats["skipped_empty"] == 1.0 and stats["num_seqs"] == 0.0 and len(opt.state) == 0
    with pytest.raises(ValueError, match="needs a reference policy"):
        policy_update(model, opt, _random_seqs(2, seed=1), RLConfig(kl_coef=1e-3))


def test_update_restores_train_mode_and_makes_one_step(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    model.eval()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0))
    stats = policy_update(model, opt, _random_seqs(6, seed=12), RLConfig(kl_coef=0.0, micro_batch_tokens=30))
    assert not model.training
    assert stats["num_seqs"] == 6 and stats["num_seqs_memory"] == 2 and stats["skipped_nonfinite"] == 0.0
    assert {int(s["step"]) for s in opt.state.values()} == {1}


# --- LoRA: reference = adapters disabled --------------------------------------------------------------------

def test_lora_reference_is_the_base_model_and_only_adapters_train(tiny_model_dir: Path) -> None:
    base = _load(tiny_model_dir)
    seqs = _random_seqs(4, seed=13)
    base_lp = sequence_logprobs(base, seqs, 10_000)
    model = apply_lora(_load(tiny_model_dir), LoraConfig(rank=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())

    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in adapters.values())
    cfg = RLConfig(kl_coef=0.1, micro_batch_tokens=50)
    first = policy_update(model, opt, seqs, cfg)  # ref=None -> the peft model with its adapters disabled
    assert first["kl"] == 0.0  # B = 0 at init: policy == reference exactly
    second = policy_update(model, opt, seqs, cfg)
    assert second["kl"] > 0.0  # the adapters moved; the reference did not

    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen weight {n} changed"
    assert any(not torch.equal(p.detach(), adapters[n]) for n, p in model.named_parameters() if n in adapters)

    adapted = sequence_logprobs(model, seqs, 10_000)
    with model.disable_adapter():
        disabled = sequence_logprobs(model, seqs, 10_000)
    for a, d, b in zip(adapted, disabled, base_lp, strict=True):
        torch.testing.assert_close(d, b, atol=1e-5, rtol=0)
        assert float((a - b).abs().max()) > 1e-4


def test_every_update_statistic_has_a_rule_for_combining_over_ranks(tiny_model_dir: Path) -> None:
    """Data-parallel runs combine each statistic by its set in rl.distributed; one missing from every set
    would silently log rank 0's value (as num_seqs_search once did)."""
    from memtrain.rl import distributed as d

    model = _load(tiny_model_dir)
    cfg = RLConfig(kl_coef=0.0, tis_cap=2.0, old_logprobs="recompute")
    stats = policy_update(model, build_optimizer(model, OptimConfig(lr=1e-4)), _random_seqs(3, 0), cfg)
    ruled = d.SUM_STATS | d.TOKEN_MEAN_STATS | d.SEQ_MEAN_STATS | d.MIN_STATS | d.MAX_STATS
    same_on_every_rank = {"grad_norm", "lr", "update_ratio", "skipped_nonfinite", "nonfinite_params",
                          "skipped_exploded", "skipped_empty",
                          "old_logprob_source"}
    assert set(stats) - ruled - same_on_every_rank == set()


# --- a step that makes the weights non-finite is undone -----------------------------------------------------

def _state_copy(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def test_step_that_makes_weights_nonfinite_is_undone_and_counted(tiny_model_dir: Path) -> None:
    """A finite but huge lr (config validation only rejects inf/nan) overflows float32 weights: the step is
    undone exactly (weights, AdamW moments, scheduler) and reported as a non-finite skip."""
    model = _load(tiny_model_dir)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, warmup_steps=0)
    seqs = _random_seqs(4, seed=21)
    assert policy_update(model, opt, seqs, RLConfig(kl_coef=0.0), scheduler=sched)["nonfinite_params"] == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = _state_copy(opt)
    opt.param_groups[0]["lr"] = 1e39
    stats = policy_update(model, opt, seqs, RLConfig(kl_coef=0.0), scheduler=sched)
    assert stats["skipped_nonfinite"] == 1.0 and stats["nonfinite_params"] == 1.0
    assert math.isfinite(float(stats["grad_norm"]))  # the gradients were fine: the result was not
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None
    assert _state_copy(opt).keys() == moments.keys()
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, moments[id(p)][k]), k
    assert sched.last_epoch == 1
    opt.param_groups[0]["lr"] = 1e-3  # the next normal step proceeds from the restored state
    assert policy_update(model, opt, seqs, RLConfig(kl_coef=0.0), scheduler=sched)["skipped_nonfinite"] == 0.0
    assert {int(s["step"]) for s in opt.state.values()} == {2}


def test_first_step_undone_leaves_no_optimizer_state_and_no_copy_raises(tiny_model_dir: Path) -> None:
    from memtrain.rl.optim import NonFiniteParamsError

    model = _load(tiny_model_dir)
    opt = build_optimizer(model, OptimConfig(lr=1.0))
    for group in opt.param_groups:  # past what the config accepts: the undo must hold for any overflow
        group["lr"] = 1e39
    stats = policy_update(model, opt, _random_seqs(3, seed=22), RLConfig(kl_coef=0.0))
    assert stats["nonfinite_params"] == 1.0 and len(opt.state) == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with pytest.raises(NonFiniteParamsError, match=r"made some weights non-finite, and no copy was kept"):
        policy_update(model, opt, _random_seqs(3, seed=22), RLConfig(kl_coef=0.0), snapshot_max_bytes=0)
