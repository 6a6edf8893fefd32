"""The algorithmic core of GRPO for MemTrain (MEMTRAIN.md section 4): pure torch functions, no model.

Rewards -> group advantages -> DAPO filter -> clipped policy loss + k3 KL -> aggregation. Everything here is
a function of tensors only, so each step can be checked against hand-computed numbers; the model-facing
code (forward passes, micro-batches, optimizer) lives in ``memtrain.rl.update``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["seq_mean_token_mean", "token_mean", "session_mean"]
LOSS_AGG_MODES: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "session_mean")


def _as_float_tensor(x: Tensor | Sequence[float] | Sequence[Sequence[float]], name: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float32)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite numbers, got {t.tolist()}")
    return t


def e2e_rewards(match: Tensor | Sequence[float], imr_matches: Tensor | Sequence[Sequence[float]] | None,
                lam: float) -> Tensor:
    """R_E(i) = match(i) + (lam / G2) * sum_j R_I(i, j): the IMR recall of a trajectory's memory pays into it.

    ``match``: [G1] (or any leading shape [..., G1]); ``imr_matches``: [..., G1, G2] or None (E2E only, or
    ``lam == 0``). The IMR term is a mean over the G2 samples, so lambda is the weight of a perfect recall.
    """
    m = _as_float_tensor(match, "match")
    if lam < 0:
        raise ValueError(f"lam: expected >= 0, got {lam}")
    if imr_matches is None:
        return m.clone()
    imr = _as_float_tensor(imr_matches, "imr_matches").to(m.dtype)
    if imr.dim() != m.dim() + 1 or imr.shape[:-1] != m.shape or imr.shape[-1] == 0:
        raise ValueError(f"imr_matches: expected shape {(*m.shape, 'G2')} with G2 >= 1 (one row of G2 IMR "
                         f"matches per trajectory), got {tuple(imr.shape)}")
    return m + (lam / imr.shape[-1]) * imr.sum(-1)


def group_index(group_ids: Sequence[Hashable]) -> tuple[Tensor, list[Hashable]]:
    """Map arbitrary hashable group ids to 0..K-1 in first-seen order; returns (index [N], keys [K])."""
    keys: dict[Hashable, int] = {}
    idx = [keys.setdefault(g, len(keys)) for g in group_ids]
    return torch.tensor(idx, dtype=torch.long), list(keys)


def _grouped(rewards: Tensor, group_ids: Sequence[Hashable] | None) -> tuple[Tensor, Tensor, int]:
    """Flatten rewards to [N] with a group index [N] from either form the public functions accept."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError("rewards: without group_ids expected shape [num_groups, G], "
                             f"got {tuple(rewards.shape)}")
        k, g = rewards.shape
        return rewards.reshape(-1), torch.arange(k).repeat_interleave(g), k
    if rewards.dim() != 1 or rewards.shape[0] != len(group_ids):
        raise ValueError(f"rewards: with group_ids expected shape [{len(group_ids)}] (one reward per id), "
                         f"got {tuple(rewards.shape)}")
    idx, keys = group_index(group_ids)
    return rewards, idx, len(keys)


def group_advantages(rewards: Tensor | Sequence[float] | Sequence[Sequence[float]],
                     group_ids: Sequence[Hashable] | None = None, std_norm: bool = False,
                     eps: float = 1e-6) -> Tensor:
    """Dr. GRPO advantages A = R - mean(R over its group); with ``std_norm`` divided by (std + eps).

    ``rewards`` is [num_groups, G] (``group_ids`` None) or [N] with one group id per element; the result has
    the shape of ``rewards``. The std is the unbiased one (as GRPO/verl); a group whose rewards are all equal
    (a group of one included) gets advantage exactly 0.
    """
    r = _as_float_tensor(rewards, "rewards")
    flat, idx, k = _grouped(r, group_ids)
    counts = torch.zeros(k, dtype=flat.dtype).index_add_(0, idx, torch.ones_like(flat))
    mean = torch.zeros(k, dtype=flat.dtype).index_add_(0, idx, flat) / counts
    adv = flat - mean[idx]
    if std_norm:
        sq = torch.zeros(k, dtype=flat.dtype).index_add_(0, idx, adv * adv)
        std = torch.sqrt(sq / (counts - 1).clamp(min=1))
        adv = adv / (std[idx] + eps)
    # an all-equal group has exactly zero advantage (no rounding residue of the mean blown up by 1/eps)
    adv = adv.masked_fill(_uniform(flat, idx, k, 0.0)[idx], 0.0)
    return adv.reshape(r.shape)


def _uniform(flat: Tensor, idx: Tensor, k: int, atol: float) -> Tensor:
    """[k] bool: whether each group's max - min <= atol."""
    big = torch.finfo(flat.dtype).max
    lo = torch.full((k,), big, dtype=flat.dtype).scatter_reduce(0, idx, flat, reduce="amin")
    hi = torch.full((k,), -big, dtype=flat.dtype).scatter_reduce(0, idx, flat, reduce="amax")
    return (hi - lo) <= atol


def uniform_groups_mask(rewards: Tensor | Sequence[float] | Sequence[Sequence[float]],
                        group_ids: Sequence[Hashable] | None = None, atol: float = 1e-8) -> Tensor:
    """DAPO dynamic filter: True for every element whose group's rewards are all equal (to be dropped).

    Such groups carry no learning signal (their Dr. GRPO advantages are all 0) but would still dilute the
    per-sequence mean. Same shapes as ``group_advantages``; returns a bool tensor shaped like ``rewards``.
    """
    r = _as_float_tensor(rewards, "rewards")
    flat, idx, k = _grouped(r, group_ids)
    return _uniform(flat, idx, k, atol)[idx].reshape(r.shape)


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float = 20.0) -> Tensor:
    """Per-token k3 ("low-variance") estimate of KL(pi || ref): exp(d) - d - 1 with d = ref_logp - logp.

    Unbiased for the KL when tokens are sampled from pi, always >= 0, and 0 exactly where the two agree.
    ``d`` is clamped to [-clamp, clamp] so one wildly off token cannot overflow exp() into inf.
    """
    d = (ref_logp - logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1.0


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = e^(lp - old).

    ``logp``/``old_logp``/``mask``: [B, T] (mask 1 on completion tokens); ``advantages``: [B] (broadcast over
    the sequence's tokens) or [B, T]. Returns the per-token loss [B, T] (zero where masked) and detached
    token-mean stats over the mask: clip_frac (tokens where the clipped branch is taken, i.e. the
    gradient is cut), approx_kl (mean old_logp - logp, the PPO drift), ratio_mean/ratio_min/ratio_max,
    num_tokens.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    mask_f = mask.to(logp.dtype)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped) * mask_f
    with torch.no_grad():
        is_clipped = (clipped > unclipped).to(logp.dtype)
        valid = mask.bool()
        r = ratio.detach()[valid]
        stats = {
            "clip_frac": _masked_mean(is_clipped, mask_f),
            "approx_kl": _masked_mean(-log_ratio.detach(), mask_f),
            "ratio_mean": r.mean() if r.numel() else torch.tensor(1.0),
            "ratio_min": r.min() if r.numel() else torch.tensor(1.0),
            "ratio_max": r.max() if r.numel() else torch.tensor(1.0),
            "num_tokens": mask_f.sum(),
        }
    return per_token, stats


def truncated_is_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor,
                         cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level truncated importance weights min(pi_train / pi_sampler, cap) for the train/inference gap.

    The sampler (e.g. a bf16 engine) draws tokens from a slightly different distribution than the trainer
    scores; weighting each token's policy-gradient term by the ratio makes the gradient that of the trainer's
    own distribution again, and truncating at ``cap`` bounds the variance (TIS, as verl's token-level
    ``rollout_is`` with ``rollout_is_threshold``). Weights are detached (a correction, not a path for the
    gradient), 0 where masked. ``trainer_logp``/``sampler_logp``/``mask``: [B, T]. Stats over the mask:
    weight_mean, raw_ratio_max (before truncation), trunc_frac (tokens at the cap), mismatch_kl (mean
    sampler - trainer log-prob: the k1 estimate of KL(sampler || trainer) on sampled tokens).
    """
    if cap <= 0:
        raise ValueError(f"cap: expected > 0, got {cap}")
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)}, sampler_logp "
                         f"{tuple(sampler_logp.shape)} and mask {tuple(mask.shape)} must have the same shape")
    with torch.no_grad():
        mask_f = mask.to(torch.float32)
        log_ratio = (trainer_logp.detach().float() - sampler_logp.float()) * mask_f
        raw = torch.exp(log_ratio.clamp(-20.0, 20.0))
        weights = raw.clamp(max=cap) * mask_f
        valid = mask.bool()
        stats = {
            "weight_mean": _masked_mean(weights, mask_f),
            "raw_ratio_max": raw[valid].max() if valid.any() else torch.tensor(1.0),
            "trunc_frac": _masked_mean((raw > cap).to(torch.float32), mask_f),
            "mismatch_kl": _masked_mean(-log_ratio, mask_f),
        }
    return weights, stats


def session_sizes(sessions: Sequence[Hashable | None]) -> list[int]:
    """For each sequence, how many sequences (of this list) share its session; None is a session of its own.

    A session is one rollout: an E2E trajectory (all its memory turns + the final turn), one IMR sample, one
    search episode. ``session_mean`` gives each sequence the weight 1 / its session's size.
    """
    counts = Counter(s for s in sessions if s is not None)
    return [1 if s is None else counts[s] for s in sessions]


def num_sessions(sessions: Sequence[Hashable | None]) -> int:
    """The number of distinct sessions in ``sessions`` (each None counts as one)."""
    return len({s for s in sessions if s is not None}) + sum(1 for s in sessions if s is None)


def aggregate(per_token: Tensor, mask: Tensor, mode: LossAgg = "seq_mean_token_mean",
              num_seqs_total: int | None = None, num_tokens_total: int | None = None,
              session_size: Tensor | Sequence[int] | None = None,
              num_sessions_total: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar. With L_i = the mean of sequence i's per-token loss:

    - ``seq_mean_token_mean`` (paper Eq. 4): sum_i L_i / num_seqs_total. Every sequence (E2E step or IMR
      sample) weighs the same, however long; so a trajectory with more chunks (more turns) weighs more.
    - ``token_mean`` (reference scripts): sum over all tokens / num_tokens_total. Long outputs weigh more.
    - ``session_mean``: sum_i L_i / session_size_i / num_sessions_total, i.e. the mean over sessions of
      the mean over each session's sequences. Every rollout (trajectory, IMR sample, search episode) weighs
      the same, whatever its number of turns. ``session_size`` [B]: the number of sequences in row i's
      session over the WHOLE batch (``session_sizes``); required for this mode.

    The totals default to this batch's own counts. Passing the WHOLE batch's totals while calling this on
    micro-batches makes the sum of the micro-batch losses equal the full-batch loss exactly, so gradient
    accumulation reproduces the full-batch gradient.
    """
    mask_f = mask.to(per_token.dtype)
    if mode in ("seq_mean_token_mean", "session_mean"):
        lengths = mask_f.sum(-1)
        if (lengths == 0).any():
            raise ValueError("aggregate: a sequence with no unmasked token cannot have a per-sequence mean")
        seq_loss = (per_token * mask_f).sum(-1) / lengths  # L_i
        if mode == "seq_mean_token_mean":
            n = per_token.shape[0] if num_seqs_total is None else num_seqs_total
            return seq_loss.sum() / n
        if session_size is None:
            raise ValueError("aggregate: mode 'session_mean' needs session_size (sequences per session)")
        size = torch.as_tensor(session_size, dtype=per_token.dtype, device=per_token.device)
        if size.shape != seq_loss.shape or bool((size < 1).any()):
            raise ValueError(f"aggregate: session_size must be [{seq_loss.shape[0]}] values >= 1, got "
                             f"{size.tolist()}")
        n_sessions = float((1.0 / size).sum()) if num_sessions_total is None else num_sessions_total
        return (seq_loss / size).sum() / n_sessions
    if mode == "token_mean":
        n_tok = mask_f.sum() if num_tokens_total is None else num_tokens_total
        return (per_token * mask_f).sum() / n_tok
    raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")
