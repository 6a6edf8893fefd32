"""The statistics one GRPO update logs (``memtrain.rl.update.policy_update``): running sums over its
micro-batches, finalised into per-token and per-sequence means that do not depend on the micro-batch plan."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from memtrain.agent.types import TURN_KINDS
from memtrain.rl.core import num_sessions
from memtrain.rl.rollout import TrainSequence


@dataclass
class UpdateStats:
    """Running sums over the micro-batches of one update; ``finalise`` turns them into the logged statistics.

    Means over tokens are kept as sums weighted by each micro-batch's tokens, so they do not depend on the
    micro-batch plan (and ``memtrain.rl.distributed`` re-weights them over ranks, by stat name).
    """

    loss: float = 0.0  # the loss terms: each micro-batch's share of the full-batch loss, so they add up
    pg_loss: float = 0.0
    kl: float = 0.0
    entropy_sum: float = 0.0
    clip_sum: float = 0.0
    approx_kl_sum: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    finite: bool = True
    # sampler vs recomputed log-probs, over the micro-batches whose sequences all carry sampler log-probs
    diff_tokens: int = 0
    diff_max: float = 0.0
    diff_sum: float = 0.0  # |sampler - recomputed|
    mismatch_sum: float = 0.0  # sampler - recomputed: the k1 estimate of KL(sampler || trainer)
    sampler_seqs: int = 0  # sequences trained with the sampler's log-probs as the old ones
    # truncated importance weights (rl.tis_cap)
    tis_tokens: float = 0.0
    tis_weight_sum: float = 0.0
    tis_trunc_sum: float = 0.0
    tis_ratio_max: float = -math.inf

    def add_sampler_diff(self, sampler_logp: Tensor, current: Tensor, mask: Tensor) -> Tensor:
        """Record how far the sampler's log-probs are from the recomputed ones; returns each row's (each
        sequence's) largest gap, [B]."""
        mask_f = mask.float()
        diff = (sampler_logp - current).abs() * mask_f
        per_row = diff.amax(dim=-1)
        largest = float(per_row.max())
        self.diff_max = max(self.diff_max, largest)
        self.diff_sum += float(diff.sum())
        self.mismatch_sum += float(((sampler_logp - current) * mask_f).sum())
        self.diff_tokens += int(mask.sum())
        return per_row

    def add_tis(self, tis_stats: dict[str, Tensor], mask: Tensor) -> None:
        n = float(mask.sum())
        self.tis_tokens += n
        self.tis_weight_sum += float(tis_stats["weight_mean"]) * n
        self.tis_trunc_sum += float(tis_stats["trunc_frac"]) * n
        self.tis_ratio_max = max(self.tis_ratio_max, float(tis_stats["raw_ratio_max"]))

    def add_loss(self, loss: Tensor, loss_stats: dict[str, Tensor]) -> None:
        """One micro-batch's loss (``grpo_loss``) and its stats, with the sum of its tokens' entropies."""
        n_tok = float(loss_stats["num_tokens"])
        self.loss += float(loss.detach())
        self.pg_loss += float(loss_stats["pg_loss"])
        self.kl += float(loss_stats["kl"])
        self.entropy_sum += float(loss_stats["entropy_sum"])
        self.clip_sum += float(loss_stats["clip_frac"]) * n_tok
        self.approx_kl_sum += float(loss_stats["approx_kl"]) * n_tok
        self.ratio_sum += float(loss_stats["ratio_mean"]) * n_tok
        self.ratio_min = min(self.ratio_min, float(loss_stats["ratio_min"]))
        self.ratio_max = max(self.ratio_max, float(loss_stats["ratio_max"]))

    def old_logprob_source(self, num_seqs: int) -> str:
        if self.sampler_seqs == num_seqs:
            return "sampler"
        return "recomputed" if self.sampler_seqs == 0 else "mixed"

    def finalise(self, seqs: Sequence[TrainSequence], num_micro_batches: int) -> dict[str, float | str]:
        """The statistics of this rank's share of the update (``policy_update`` adds the step's own).

        loss (nan when a micro-batch loss was not finite), pg_loss, kl (k3, before kl_coef), entropy,
        clip_frac, approx_kl, ratio_mean/min/max, num_seqs, num_tokens, num_sessions,
        num_seqs_{memory,final,imr,search}, num_micro_batches, adv_mean, adv_abs_mean, old_logprob_source
        ('sampler' | 'recomputed' | 'mixed'), old_logprob_sampler_frac, old_logprob_max_diff/mean_diff
        (nan without sampler log-probs), mismatch_kl (mean sampler - recomputed log-prob: the train/inference
        gap as a k1 KL estimate; nan without sampler log-probs), tis_frac (share of tokens reweighted by
        ``rl.tis_cap``), tis_weight_mean/tis_trunc_frac/tis_ratio_max (nan when none were), nonfinite_loss.
        """
        num_seqs, num_tokens, sessions = batch_counts(seqs)
        per_tok, per_seq, diffs, tis = max(num_tokens, 1), max(num_seqs, 1), self.diff_tokens, self.tis_tokens
        return {
            "loss": self.loss if self.finite else math.nan,
            "pg_loss": self.pg_loss,
            "kl": self.kl,
            "entropy": self.entropy_sum / per_tok,
            "clip_frac": self.clip_sum / per_tok,
            "approx_kl": self.approx_kl_sum / per_tok,
            "ratio_mean": self.ratio_sum / per_tok,
            "ratio_min": self.ratio_min if self.ratio_min != math.inf else 1.0,
            "ratio_max": self.ratio_max if self.ratio_max != -math.inf else 1.0,
            "num_seqs": float(num_seqs),
            "num_tokens": float(num_tokens),
            "num_sessions": float(sessions),
            **{f"num_seqs_{k}": float(sum(1 for s in seqs if s.kind == k)) for k in TURN_KINDS},
            "num_micro_batches": float(num_micro_batches),
            "adv_mean": sum(s.advantage for s in seqs) / per_seq,
            "adv_abs_mean": sum(abs(s.advantage) for s in seqs) / per_seq,
            "old_logprob_source": self.old_logprob_source(num_seqs),
            "old_logprob_sampler_frac": self.sampler_seqs / per_seq,
            "old_logprob_max_diff": self.diff_max if diffs else math.nan,
            "old_logprob_mean_diff": self.diff_sum / diffs if diffs else math.nan,
            "mismatch_kl": self.mismatch_sum / diffs if diffs else math.nan,
            "tis_frac": tis / per_tok,
            "tis_weight_mean": self.tis_weight_sum / tis if tis else math.nan,
            "tis_trunc_frac": self.tis_trunc_sum / tis if tis else math.nan,
            "tis_ratio_max": self.tis_ratio_max if tis else math.nan,
            "nonfinite_loss": 0.0 if self.finite else 1.0,
        }


def batch_counts(seqs: Sequence[TrainSequence]) -> tuple[int, int, int]:
    """(sequences, completion tokens, sessions) of a batch: what its loss is normalised by."""
    return len(seqs), sum(len(s.completion_ids) for s in seqs), num_sessions([s.session for s in seqs])
