"""Compute precision (memtrain.precision) and the train/inference mismatch correction (rl.tis_cap).

bf16 compute over float32 master weights: detection, the autocast the update and the HF engine share, the
engine's bf16 KV cache, sampler-vs-trainer log-prob agreement, and truncated importance sampling checked by
hand and on a bandit whose sampler is deliberately off.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from memtrain.config import ConfigError, ModelConfig, RLConfig
from memtrain.engines import hf as hf_engine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_tokenizer
from memtrain.precision import (
    _cpuinfo_flags,
    autocast_dtype,
    autocast_for,
    compute_dtype_of,
    has_fast_bf16,
    resolve_compute_dtype,
    set_compute_dtype,
)
from memtrain.rl.core import truncated_is_weights
from memtrain.rl.logprobs import sequence_logprobs
from memtrain.rl.rollout import TrainSequence
from memtrain.rl.update import accumulate_policy_gradients, policy_update


def _load(model_dir: Path, compute: torch.dtype | None = None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if compute is not None:
        set_compute_dtype(model, compute)
    return model


def _prompts(tokenizer: Any) -> list[list[int]]:
    texts = ["Say a number.", "Which entity does [MASK] stand for in the long article?", "Read the chunk."]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                               add_generation_prompt=True)["input_ids"]) for t in texts]


# --- detection and resolution ------------------------------------------------------------------------------

def test_cpuinfo_flags_read_x86_and_arm_lines(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "amx_tile", "fpu"} <= _cpuinfo_flags(str(x86))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "bf16" in _cpuinfo_flags(str(arm))
    assert _cpuinfo_flags(str(tmp_path / "missing")) == frozenset()


def test_resolve_compute_dtype() -> None:
    assert resolve_compute_dtype("float32", "cpu") == torch.float32
    assert resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu") == (torch.bfloat16 if has_fast_bf16("cpu") else torch.float32)
    with pytest.raises(ValueError, match="compute dtype 'float16'"):
        resolve_compute_dtype("float16", "cpu")
    assert ModelConfig().compute_dtype == "auto"
    with pytest.raises((ConfigError, ValueError)):
        ModelConfig(compute_dtype="float16")  # type: ignore[arg-type]


def test_autocast_follows_the_model_setting(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    assert compute_dtype_of(model) is None and autocast_dtype(model) is None  # CPU default: fp32, as before
    with autocast_for(model):
        assert not torch.is_autocast_enabled("cpu")
    set_compute_dtype(model, torch.bfloat16)
    with autocast_for(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    set_compute_dtype(model, torch.float32)
    assert autocast_dtype(model) is None
    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    set_compute_dtype(half, torch.bfloat16)
    assert autocast_dtype(half) is None  # bf16 weights already compute in bf16: no autocast on top
    with pytest.raises(ValueError, match="float16"):
        set_compute_dtype(model, torch.float16)


# --- the HF engine in bf16 ---------------------------------------------------------------------------------

def test_engine_bf16_cache_is_bf16_and_exact(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the KV cache is stored in bf16, and that changes no number: attention casts
    k/v to bf16 anyway, so generation with the default (fp32) cache gives the very same tokens/log-probs."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = _load(tiny_model_dir, torch.bfloat16)
    engine = HFEngine(model, tok)
    with torch.no_grad(), autocast_for(model):
        _, cache, _ = engine._prefill(_prompts(tok))
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
    assert {layer.values.dtype for layer in cache.layers} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # no weight was converted in place

    reqs = [GenerationRequest(p, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=5))
            for p in _prompts(tok)]
    ours = engine.generate(reqs)
    monkeypatch.setattr(hf_engine, "new_cache", lambda model, dtype: None)  # the model's own fp32 cache
    theirs = engine.generate(reqs)
    for a, b in zip(ours, theirs, strict=True):
        for ca, cb in zip(a, b, strict=True):
            assert ca.token_ids == cb.token_ids and ca.logprobs == cb.logprobs


def test_engine_bf16_greedy_and_logprobs_agree_with_the_trainer(tiny_model_dir: Path) -> None:
    """bf16 vs fp32 greedy tokens mostly equal; the bf16 engine's log-probs match the trainer's bf16 recompute
    within bf16 tolerance (tiny model, measured: mean ~2e-4, max ~2e-3 nats), well under old_logprob_tol."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = _load(tiny_model_dir, torch.float32)
    engine = HFEngine(model, tok)
    prompts = _prompts(tok)
    greedy = [GenerationRequest(p, SamplingParams(n=1, temperature=0.0, max_tokens=16)) for p in prompts]
    fp32 = engine.generate(greedy)
    set_compute_dtype(model, torch.bfloat16)
    bf16 = engine.generate(greedy)
    pairs = [(a, b) for x, y in zip(fp32, bf16, strict=True) for ca, cb in zip(x, y, strict=True)
             for a, b in zip(ca.token_ids, cb.token_ids, strict=False)]
    assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)

    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=2)
    sampled = engine.generate([GenerationRequest(p, params) for p in prompts])
    seqs = [TrainSequence(p, c.token_ids, 0.0, c.logprobs) for p, cs in zip(prompts, sampled, strict=True)
            for c in cs]
    recomputed = sequence_logprobs(model, seqs, 100_000)
    gap = torch.cat([(torch.tensor(s.old_logprobs) - r).abs() for s, r in zip(seqs, recomputed, strict=True)])
    assert float(gap.mean()) < 5e-3 and float(gap.max()) < 2e-2, (float(gap.mean()), float(gap.max()))


# --- the update in bf16 ------------------------------------------------------------------------------------

def test_bf16_update_keeps_fp32_master_weights_and_reuses_sampler_logprobs(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = _load(tiny_model_dir, torch.bfloat16)
    ref = _load(tiny_model_dir, torch.bfloat16).eval().requires_grad_(False)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1)
    outs = HFEngine(model, tok).generate([GenerationRequest(p, params) for p in _prompts(tok)])
    seqs = [TrainSequence(p, c.token_ids, 0.5 * (j - 1), c.logprobs, group=f"g{i}")
            for i, (p, cs) in enumerate(zip(_prompts(tok), outs, strict=True)) for j, c in enumerate(cs)]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    st = policy_update(model, opt, seqs, RLConfig(kl_coef=0.1), ref=ref)
    assert st["skipped_nonfinite"] == 0.0 and math.isfinite(st["grad_norm"]) and st["grad_norm"] > 0
    assert st["old_logprob_source"] == "sampler"  # engine and trainer agree within old_logprob_tol in bf16
    assert st["old_logprob_max_diff"] < 2e-2 and abs(st["mismatch_kl"]) < 5e-3
    assert st["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference runs in the same compute dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# --- truncated importance sampling -------------------------------------------------------------------------

def test_truncated_is_weights_by_hand() -> None:
    trainer = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)], [math.log(0.3), 0.0, 0.0]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.1)], [math.log(0.3), 5.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w, st = truncated_is_weights(trainer, sampler, mask, cap=3.0)
    # ratios 2, 0.5, 9 -> capped at 3, 1; padding -> 0
    assert w.flatten().tolist() == pytest.approx([2.0, 0.5, 3.0, 1.0, 0.0, 0.0], rel=1e-6)
    assert float(st["weight_mean"]) == pytest.approx((2 + 0.5 + 3 + 1) / 4, rel=1e-6)
    assert float(st["trunc_frac"]) == pytest.approx(0.25)
    assert float(st["raw_ratio_max"]) == pytest.approx(9.0, rel=1e-5)
    kl = -(math.log(2) + math.log(0.5) + math.log(9) + 0.0) / 4
    assert float(st["mismatch_kl"]) == pytest.approx(kl, rel=1e-6)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(trainer, sampler, mask, cap=0.0)
    with pytest.raises(ValueError, match="same shape"):
        truncated_is_weights(trainer, sampler[:, :2], mask, cap=2.0)


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class BanditLM(torch.nn.Module):
    """A one-step bandit shaped like a causal LM: the same logits ``theta`` at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 1, use_cache: bool = False) -> _Out:
        return _Out(self.theta.expand(input_ids.shape[0], logits_to_keep, -1))


def _bandit_gradient(model: BanditLM, sampler_logp: torch.Tensor, weights: torch.Tensor, reward: torch.Tensor,
                     cfg: RLConfig) -> torch.Tensor:
    """The update's gradient on one sequence per arm, arm ``a`` weighted by ``weights[a]`` (its share of
    the sampled batch) through the advantage (the loss is linear in it at ratio 1), with the sampler's
    log-prob."""
    seqs = [TrainSequence([0], [a], float(weights[a] * reward[a] * len(reward)), [float(sampler_logp[a])])
            for a in range(len(reward))]
    model.zero_grad(set_to_none=True)
    accumulate_policy_gradients(model, seqs, cfg)
    assert model.theta.grad is not None
    return -model.theta.grad.clone()  # ascent direction of E[reward]


def test_tis_makes_the_gradient_from_an_off_sampler_match_the_on_policy_one() -> None:
    """The sampler draws from q = softmax(theta + noise) (a large train/inference gap); the trainer's policy
    is p = softmax(theta). The true gradient of E_p[reward] is sum_a p(a) r(a) grad log p(a). Using q's
    samples as if they were p's is biased; TIS with a cap above every ratio recovers it exactly, and a small
    cap is still much closer. Exact expectation over the arms, then a seeded Monte-Carlo batch."""
    gen = torch.Generator().manual_seed(0)
    k = 8
    theta = torch.randn(k, generator=gen)
    q_logits = theta + 1.2 * torch.randn(k, generator=gen)  # a deliberately off sampler
    reward = torch.randn(k, generator=gen)
    p, q = theta.softmax(-1), q_logits.softmax(-1)
    log_q = q_logits.log_softmax(-1)
    ratios = p / q
    assert float(ratios.max()) > 2.0  # a large gap
    true = p * reward - p * float((p * reward).sum())  # grad_theta E_p[r] for softmax logits

    base = RLConfig(kl_coef=0.0, old_logprobs="recompute", loss_agg="token_mean", clip_low=0.2, clip_high=0.2)
    model = BanditLM(theta)
    plain = _bandit_gradient(model, log_q, q, reward, base)
    exact = _bandit_gradient(model, log_q, q, reward, base.model_copy(update={"tis_cap": 1e3}))
    capped = _bandit_gradient(model, log_q, q, reward, base.model_copy(update={"tis_cap": 2.0}))
    err = {name: float((g - true).norm())
           for name, g in [("plain", plain), ("exact", exact), ("cap2", capped)]}
    assert err["exact"] < 1e-5, err
    assert err["cap2"] < 0.5 * err["plain"], err

    # Monte-Carlo: 20000 seeded draws from q; arms weighted by their empirical frequency
    draws = torch.multinomial(q, 20_000, replacement=True, generator=gen)
    freq = torch.bincount(draws, minlength=k).float() / draws.numel()
    mc_plain = _bandit_gradient(model, log_q, freq, reward, base)
    mc_tis = _bandit_gradient(model, log_q, freq, reward, base.model_copy(update={"tis_cap": 1e3}))
    assert float((mc_tis - true).norm()) < 0.3 * float((mc_plain - true).norm())


def test_tis_stats_and_when_it_applies() -> None:
    """TIS reweights only where the old log-probs are the trainer's recompute; sampler-verified micro-batches
    already carry the sampler in the PPO ratio. Stats: share of tokens reweighted, mean weight, truncation."""
    theta = torch.tensor([0.0, 1.0, -1.0])
    log_p = theta.log_softmax(-1)
    model = BanditLM(theta)
    off = log_p - torch.tensor([0.0, 1.5, -0.2])  # sampler log-probs: ratios 1, e^1.5, e^-0.2
    seqs = [TrainSequence([0], [a], 1.0, [float(off[a])]) for a in range(3)]
    cfg = RLConfig(kl_coef=0.0, old_logprobs="recompute", tis_cap=2.0, micro_batch_tokens=100)
    st = accumulate_policy_gradients(model, seqs, cfg)
    assert st["tis_frac"] == 1.0 and st["tis_trunc_frac"] == pytest.approx(1 / 3)
    assert st["tis_weight_mean"] == pytest.approx((1.0 + 2.0 + math.exp(-0.2)) / 3, rel=1e-5)
    assert st["tis_ratio_max"] == pytest.approx(math.exp(1.5), rel=1e-5)
    assert st["mismatch_kl"] == pytest.approx((0.0 - 1.5 + 0.2) / 3, rel=1e-5)
    off_st = accumulate_policy_gradients(model, seqs, cfg.model_copy(update={"tis_cap": None}))
    assert off_st["tis_frac"] == 0.0 and math.isnan(off_st["tis_weight_mean"])
    close = [TrainSequence([0], [a], 1.0, [float(log_p[a]) - 1e-3]) for a in range(3)]
    auto = accumulate_policy_gradients(model, close, cfg.model_copy(update={"old_logprobs": "auto"}))
    assert auto["old_logprob_source"] == "sampler" and auto["tis_frac"] == 0.0


def test_inference_loading_follows_the_compute_dtype(tiny_model_dir) -> None:
    """Evaluation loads weights in the compute dtype (auto), or autocasts explicitly requested fp32 weights
    to it; it never silently computes in another dtype than the one the eval records."""
    from memtrain.models import load_policy
    from memtrain.precision import autocast_dtype

    bf16 = load_policy(str(tiny_model_dir), "auto", "cpu", inference_compute_dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    fp32 = load_policy(str(tiny_model_dir), "float32", "cpu", inference_compute_dtype="bfloat16")
    assert next(fp32.parameters()).dtype == torch.float32 and autocast_dtype(fp32) == torch.bfloat16
    plain = load_policy(str(tiny_model_dir), "float32", "cpu", inference_compute_dtype="float32")
    assert autocast_dtype(plain) is None
