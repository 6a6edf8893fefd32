"""A new loss aggregation is one decorated function, which rl.loss_agg, grpo_loss and the update accept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memtrain.config import ConfigError, RLConfig, load_config
from memtrain.rl.core import LOSS_AGGS, AggTotals, grpo_loss, register_loss_agg
from memtrain.rl.update import accumulate_policy_gradients, policy_update
from test_rl_core import _tiny_batch
from test_rl_update import _load, _random_seqs, _unpadded_logprobs


@register_loss_agg("test_seq_mean_token_sum")
def seq_mean_token_sum(per_token: torch.Tensor, mask: torch.Tensor, totals: AggTotals) -> torch.Tensor:
    """Each sequence's token SUM, averaged over the whole batch's sequences (long outputs weigh more)."""
    n = per_token.shape[0] if totals.num_seqs is None else totals.num_seqs
    return (per_token * mask).sum() / n


def test_registered_aggregation_is_a_valid_config_value_and_names_are_unique() -> None:
    assert LOSS_AGGS["test_seq_mean_token_sum"] is seq_mean_token_sum
    assert RLConfig(loss_agg="test_seq_mean_token_sum").loss_agg == "test_seq_mean_token_sum"
    assert load_config(None, ["rl.loss_agg=token_mean"]).rl.loss_agg == "token_mean"
    names = "seq_mean_token_mean, token_mean, session_mean, test_seq_mean_token_sum"
    with pytest.raises(ConfigError, match=rf"rl\.loss_agg: .*unknown mode 'sum'; registered loss "
                                          rf"aggregations: {names} \(got 'sum'\)$"):
        load_config(None, ["rl.loss_agg=sum"])
    with pytest.raises(ValueError, match="'token_mean' is already registered"):
        register_loss_agg("token_mean")(seq_mean_token_sum)


def test_grpo_loss_uses_the_registered_aggregation() -> None:
    """The [2, 3] example of test_rl_core: clipped terms -1.0 -1.2 -0.9 | 0.8 1.1, so the token sums are
    -3.1 and 1.9; over 2 sequences (or 4, as the micro-batch of a larger batch)."""
    b = _tiny_batch()
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    kw = {"kl_coef": 0.0, "clip_low": 0.2, "clip_high": 0.2, "agg": "test_seq_mean_token_sum"}
    loss, _ = grpo_loss(*args, **kw)
    assert float(loss) == pytest.approx((-3.1 + 1.9) / 2, rel=1e-6)
    loss, _ = grpo_loss(*args, **kw, totals=AggTotals(num_seqs=4))
    assert float(loss) == pytest.approx((-3.1 + 1.9) / 4, rel=1e-6)


def test_update_with_a_registered_aggregation(tiny_model_dir: Path) -> None:
    """policy_update's loss under rl.loss_agg=test_seq_mean_token_sum equals the clipped terms written out in
    plain Python, and micro-batching gives the full-batch loss (the totals reach the aggregation)."""
    model = _load(tiny_model_dir)
    seqs = _random_seqs(5, seed=6)
    for s, sign in zip(seqs, (1, -1, 1, -1, 1), strict=True):
        s.old_logprobs = [lp + 0.25 * sign for lp in _unpadded_logprobs(model, s)]  # ratios e^-/+0.25
    total = 0.0
    for s in seqs:
        assert s.old_logprobs is not None
        for lp, old in zip(_unpadded_logprobs(model, s), s.old_logprobs, strict=True):
            r = math.exp(lp - old)
            total += max(-s.advantage * r, -s.advantage * min(max(r, 0.8), 1.2))
    cfg = RLConfig(kl_coef=0.0, loss_agg="test_seq_mean_token_sum", old_logprobs="sampler",
                   micro_batch_tokens=100_000)
    stats = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), seqs, cfg)
    assert stats["loss"] == pytest.approx(total / len(seqs), rel=1e-5) and stats["clip_frac"] > 0
    micro = accumulate_policy_gradients(model, seqs, cfg.model_copy(update={"micro_batch_tokens": 20}))
    assert micro["num_micro_batches"] > 1
    assert micro["loss"] == pytest.approx(stats["loss"], rel=1e-5)
