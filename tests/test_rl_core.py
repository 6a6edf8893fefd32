"""GRPO core functions against hand-computed numbers (docs/method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.rl.core import (
    AggTotals,
    aggregate,
    clipped_policy_loss,
    e2e_rewards,
    group_advantages,
    group_index,
    grpo_loss,
    k3_kl,
    num_sessions,
    session_sizes,
    uniform_groups_mask,
)


def test_e2e_rewards_adds_mean_imr_recall_times_lambda() -> None:
    # R_E = match + lam/G2 * sum_j R_I: 1 + 0.5/4 * 2 = 1.25 ; 0 + 0.5/4 * 4 = 0.5
    r = e2e_rewards([1.0, 0.0, 1.0], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], lam=0.5)
    assert r.tolist() == [1.25, 0.5, 1.0]
    assert e2e_rewards([1.0, 0.0], [[1, 1], [1, 1]], lam=0.0).tolist() == [1.0, 0.0]
    assert e2e_rewards(torch.tensor([True, False]), None, lam=0.5).tolist() == [1.0, 0.0]
    # batched: [samples, G1] with [samples, G1, G2]
    batched = e2e_rewards([[1.0, 0.0]], [[[1.0, 0.0], [1.0, 1.0]]], lam=1.0)
    assert batched.tolist() == [[1.5, 1.0]]


def test_e2e_rewards_rejects_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="imr_matches: expected shape"):
        e2e_rewards([1.0, 0.0], [[1.0, 0.0]], lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        e2e_rewards([1.0], [[1.0]], lam=-1.0)
    with pytest.raises(ValueError, match="match: expected finite"):
        e2e_rewards([math.nan], None, lam=0.5)


def test_group_advantages_mean_centred_and_std_normalised() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(r)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [2.0, -1.0, -1.0, 0.0]]
    std_adv = group_advantages(r, std_norm=True, eps=0.0)
    s = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    assert std_adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert std_adv[1].tolist() == [0.0] * 4  # uniform group: 0 / (0 + eps) stays 0, no nan
    assert group_advantages(r, std_norm=True)[1].tolist() == [0.0] * 4
    # the rounding residue of a uniform group's mean is not blown up by 1/(std + eps)
    assert group_advantages([[0.1, 0.1, 0.1]], std_norm=True).tolist() == [[0.0, 0.0, 0.0]]


def test_group_advantages_with_group_ids_any_order() -> None:
    adv = group_advantages([1.0, 0.0, 2.0, 4.0, 7.0], group_ids=["a", "b", "a", "b", "c"])
    assert adv.tolist() == [-0.5, -2.0, 0.5, 2.0, 0.0]  # a group of one gets 0
    assert group_advantages([7.0], group_ids=["c"], std_norm=True).tolist() == [0.0]
    idx, keys = group_index(["x", "y", "x"])
    assert idx.tolist() == [0, 1, 0] and keys == ["x", "y"]
    with pytest.raises(ValueError, match="one reward per id"):
        group_advantages([1.0, 2.0], group_ids=["a"])
    with pytest.raises(ValueError, match=r"\[num_groups, G\]"):
        group_advantages([1.0, 2.0])


def test_uniform_groups_mask_marks_all_equal_groups_for_dropping() -> None:
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert uniform_groups_mask(r).tolist() == [[True] * 3, [False] * 3, [True] * 3]
    m = uniform_groups_mask([0.5, 0.5, 0.0, 1.0, 2.0], group_ids=[1, 1, 2, 2, 3])
    assert m.tolist() == [True, True, False, False, True]


def test_k3_kl_values_and_unbiasedness() -> None:
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.2]))
    kl = k3_kl(logp, ref)
    d = math.log(0.25 / 0.5)
    assert kl.tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    # E_{x~pi}[k3(x)] is exactly KL(pi || ref)
    pi = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    expected = float((pi * (pi.log() - q.log())).sum())
    assert float((pi * k3_kl(pi.log(), q.log())).sum()) == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(k3_kl(torch.tensor([0.0]), torch.tensor([-1e4]))).all()  # clamped, no inf


def test_clipped_policy_loss_per_token_hand_computed() -> None:
    # ratios 1.5, 0.5, 0.5, 1.5 ; advantages +1, +1, -1, -1 ; clip 0.2/0.2
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    per_tok, st = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    # max(-A r, -A clip(r)): A=+1,r=1.5 -> max(-1.5,-1.2)=-1.2 (clipped); A=+1,r=0.5 -> max(-0.5,-0.8)=-0.5
    # A=-1,r=0.5 -> max(0.5,0.8)=0.8 (clipped); A=-1,r=1.5 -> max(1.5,1.2)=1.5
    assert per_tok[0].tolist() == pytest.approx([-1.2, -0.5, 0.8, 1.5])
    assert float(st["clip_frac"]) == 0.5
    assert float(st["ratio_min"]) == pytest.approx(0.5) and float(st["ratio_max"]) == pytest.approx(1.5)
    assert float(st["approx_kl"]) == pytest.approx(-float(logp.detach().mean()))
    per_tok.sum().backward()
    # clipped tokens get no gradient; unclipped: d(-A r)/dlogp = -A r
    assert logp.grad is not None
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5, 0.0, 1.5])


def test_clipped_policy_loss_asymmetric_clip_and_mask() -> None:
    logp = torch.log(torch.tensor([[1.25, 1.25, 0.5]]))
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    per_tok, st = clipped_policy_loss(logp, old, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.28)
    # r = 1.25 < 1.28 is inside the (DAPO clip-higher) range: -A r = -2.5 ; masked token contributes 0
    assert per_tok[0].tolist() == pytest.approx([-2.5, -2.5, 0.0])
    assert float(st["clip_frac"]) == 0.0 and float(st["num_tokens"]) == 2.0
    with pytest.raises(ValueError, match="same shape"):
        clipped_policy_loss(logp, old[:, :2], torch.tensor([2.0]), mask)


def test_aggregate_modes_hand_computed_and_micro_batch_sums() -> None:
    per_tok = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    # seq mean of token means: (1.5 + 3 + 5) / 3 ; token mean: (1+2+3+4+5+6) / 6
    assert float(aggregate(per_tok, mask, "seq_mean_token_mean")) == pytest.approx(9.5 / 3)
    assert float(aggregate(per_tok, mask, "token_mean")) == pytest.approx(21 / 6)
    for mode in ("seq_mean_token_mean", "token_mean"):
        full = aggregate(per_tok, mask, mode)  # type: ignore[arg-type]
        parts = [aggregate(per_tok[rows], mask[rows], mode, num_seqs_total=3, num_tokens_total=6)  # type: ignore[arg-type]
                 for rows in ([0], [1, 2])]
        assert float(sum(parts)) == pytest.approx(float(full))
    with pytest.raises(ValueError, match="unknown mode"):
        aggregate(per_tok, mask, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no unmasked token"):
        aggregate(per_tok, torch.zeros_like(mask), "seq_mean_token_mean")


def _turn_weights(per_tok: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> list[float]:
    """d loss / d L_i for every sequence i (L_i = its token-mean loss): the weight each turn gets."""
    x = per_tok.clone().requires_grad_(True)
    aggregate(x, mask, **kwargs).backward()  # type: ignore[arg-type]
    assert x.grad is not None
    return x.grad.sum(-1).tolist()  # each unmasked token gets w_i / length_i, masked ones 0


def test_session_mean_weighs_every_trajectory_once_whatever_its_turns() -> None:
    """Toy batch: trajectory A = 3 turns (2 memory + final), trajectory B = 1 turn (final; a 1-chunk
    document), one IMR sample C. Per-turn token means L = 1, 2, 3 | 6 | 4."""
    per_tok = torch.tensor([[1.0, 1.0], [2.0, 9.0], [3.0, 3.0], [5.0, 7.0], [4.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0]])
    sessions = ["A", "A", "A", "B", "C"]
    sizes = session_sizes(sessions)
    assert sizes == [3, 3, 3, 1, 1] and num_sessions(sessions) == 3
    # paper Eq. 4: every turn 1/5, so A (3 turns) weighs 3/5 and B 1/5: (1 + 2 + 3 + 6 + 4) / 5
    assert float(aggregate(per_tok, mask, "seq_mean_token_mean")) == pytest.approx(16 / 5)
    w = _turn_weights(per_tok, mask, mode="seq_mean_token_mean")
    assert w == pytest.approx([0.2] * 5) and (sum(w[:3]), w[3]) == pytest.approx((0.6, 0.2))
    # session_mean: every session 1/3, split over its turns: ((1 + 2 + 3) / 3 + 6 + 4) / 3
    assert float(aggregate(per_tok, mask, "session_mean", session_size=sizes)) == pytest.approx(4.0)
    w = _turn_weights(per_tok, mask, mode="session_mean", session_size=sizes)
    assert w == pytest.approx([1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 3])
    assert sum(w[:3]) == pytest.approx(w[3]) == pytest.approx(w[4])  # A, B and C weigh the same
    # micro-batches (a trajectory split over two of them) sum to the full-batch loss with global counts
    parts = [aggregate(per_tok[rows], mask[rows], "session_mean", session_size=[sizes[i] for i in rows],
                       num_sessions_total=3) for rows in ([0, 3], [1, 2, 4])]
    assert float(sum(parts)) == pytest.approx(4.0)
    # None = a session of its own: session_mean then equals the paper's per-sequence mean
    alone = session_sizes([None] * 5)
    assert alone == [1] * 5 and num_sessions([None, None, "A", "A"]) == 3
    assert float(aggregate(per_tok, mask, "session_mean", session_size=alone)) == pytest.approx(16 / 5)
    with pytest.raises(ValueError, match="needs session_size"):
        aggregate(per_tok, mask, "session_mean")
    with pytest.raises(ValueError, match="session_size must be"):
        aggregate(per_tok, mask, "session_mean", session_size=[1, 1])


def test_full_loss_on_a_tiny_example_matches_hand_computation() -> None:
    """pg + kl_coef * k3, aggregated per sequence then over sequences (paper Eq. 4), computed by hand."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.0, -2.5], [-0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    pg, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    kl = k3_kl(logp, ref) * mask
    loss = aggregate(pg + 0.1 * kl, mask, "seq_mean_token_mean")
    # seq 0: r = (1, e^0.5=1.6487 -> clipped to 1.2 since A>0) -> tokens -1, -1.2 ; kl tokens k3(-0.5), 0
    k = math.exp(-0.5) + 0.5 - 1
    seq0 = ((-1.0 + 0.1 * k) + (-1.2)) / 2
    seq1 = 2.0  # r = 1, A = -2 -> 2 ; second token masked
    assert float(loss) == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    tok_loss = aggregate(pg + 0.1 * kl, mask, "token_mean")
    assert float(tok_loss) == pytest.approx(((-1.0 + 0.1 * k) + (-1.2) + 2.0) / 3, rel=1e-6)


# --- grpo_loss: Eq. 4 on a [2, 3] example worked out by hand ----------------------------------------------
# Sequence 0 (A = +1) has ratios 1.0, 1.5, 0.9; sequence 1 (A = -1) has 0.5, 1.1 and a masked third token.
# The clipped term max(-A r, -A clip(r, 0.8, 1.2)) per token:
#   seq 0: -1.0 ; max(-1.5, -1.2) = -1.2 (clipped) ; -0.9          token mean -3.1 / 3
#   seq 1: max(0.5, 0.8) = 0.8 (clipped) ; 1.1                     token mean  1.9 / 2
# The reference differs from the policy by d = ref - logp = ln 2, 0, 0 | 0, -ln 2, so k3 = e^d - d - 1 is
#   seq 0: 1 - ln 2 ; 0 ; 0                                        token mean (1 - ln 2) / 3
#   seq 1: 0 ; ln 2 - 1/2                                          token mean (ln 2 - 1/2) / 2
LN2 = math.log(2.0)
PG_SEQ, PG_TOKENS = (-3.1 / 3, 1.9 / 2), [-1.0, -1.2, -0.9, 0.8, 1.1]
KL_SEQ, KL_TOKENS = ((1 - LN2) / 3, (LN2 - 0.5) / 2), [1 - LN2, 0.0, 0.0, 0.0, LN2 - 0.5]
# session_mean as on a micro-batch: seq 0's session has a second sequence elsewhere in the batch, which
# holds 2 sessions in all: (L_0 / 2 + L_1 / 1) / 2
SESSIONS = AggTotals(session_size=[2, 1], num_sessions=2)
EXPECTED = {  # (pg_loss, kl) per aggregation
    "seq_mean_token_mean": (sum(PG_SEQ) / 2, sum(KL_SEQ) / 2),
    "token_mean": (sum(PG_TOKENS) / 5, sum(KL_TOKENS) / 5),
    "session_mean": ((PG_SEQ[0] / 2 + PG_SEQ[1]) / 2, (KL_SEQ[0] / 2 + KL_SEQ[1]) / 2),
}


def _tiny_batch() -> dict[str, torch.Tensor]:
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.0, -0.7]])
    logp = old + torch.log(torch.tensor([[1.0, 1.5, 0.9], [0.5, 1.1, 2.0]]))
    ref = logp + torch.tensor([[LN2, 0.0, 0.0], [0.0, -LN2, 5.0]])  # the masked token's value is ignored
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "advantages": torch.tensor([1.0, -1.0]),
            "mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "session_mean"])
def test_grpo_loss_hand_computed_for_every_aggregation(agg: str) -> None:
    b = _tiny_batch()
    totals = SESSIONS if agg == "session_mean" else AggTotals()
    pg, kl = EXPECTED[agg]
    clip = {"clip_low": 0.2, "clip_high": 0.2, "agg": agg, "totals": totals}
    loss, st = grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], kl_coef=0.0, **clip)
    assert float(loss) == pytest.approx(pg, rel=1e-6)
    assert float(st["pg_loss"]) == pytest.approx(pg, rel=1e-6) and float(st["kl"]) == 0.0
    assert float(st["clip_frac"]) == pytest.approx(2 / 5) and float(st["num_tokens"]) == 5.0
    loss, st = grpo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], ref_logp=b["ref_logp"],
                         kl_coef=0.1, **clip)
    assert float(loss) == pytest.approx(pg + 0.1 * kl, rel=1e-6)
    assert float(st["pg_loss"]) == pytest.approx(pg, rel=1e-6)
    assert float(st["kl"]) == pytest.approx(kl, rel=1e-6)


def test_grpo_loss_gradient_skips_clipped_tokens_and_tis_weights_the_pg_term() -> None:
    b = _tiny_batch()
    logp = b["logp"].clone().requires_grad_(True)
    args = (b["old_logp"], b["advantages"], b["mask"])
    kw = {"kl_coef": 0.0, "clip_low": 0.2, "clip_high": 0.2, "agg": "token_mean"}
    loss, _ = grpo_loss(logp, *args, **kw)
    loss.backward()
    # d(-A r)/dlogp = -A r on unclipped tokens, 0 on clipped and masked ones; token_mean divides by 5
    assert logp.grad is not None
    expected = [-1.0 / 5, 0.0, -0.9 / 5, 0.0, 1.1 / 5, 0.0]
    assert logp.grad.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    # truncated IS weights multiply each token's clipped term (not the KL): -2.0 -1.2 -0.9 | 0.8 0.55
    tis = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    loss, _ = grpo_loss(b["logp"], *args, tis_weights=tis, **kw)
    assert float(loss) == pytest.approx((-2.0 - 1.2 - 0.9 + 0.8 + 0.55) / 5, rel=1e-6)
    loss, st = grpo_loss(b["logp"], *args, ref_logp=b["ref_logp"], tis_weights=tis, **{**kw, "kl_coef": 0.1})
    assert float(st["kl"]) == pytest.approx(EXPECTED["token_mean"][1], rel=1e-6)


def test_grpo_loss_refuses_a_kl_without_reference_and_unknown_aggregations() -> None:
    b = _tiny_batch()
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"kl_coef=0\.1 needs ref_logp"):
        grpo_loss(*args, kl_coef=0.1, clip_low=0.2, clip_high=0.2, agg="token_mean")
    with pytest.raises(ValueError, match=r"unknown mode 'sum'; registered loss aggregations: "
                                         r"seq_mean_token_mean, token_mean, session_mean"):
        grpo_loss(*args, kl_coef=0.0, clip_low=0.2, clip_high=0.2, agg="sum")
