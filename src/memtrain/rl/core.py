"""The algorithmic core of GRPO for MemTrain (docs/method.md section 4): pure torch functions, no model.

Rewards -> group advantages -> DAPO filter -> ``grpo_loss`` (clipped policy loss + k3 KL, aggregated by a
registered ``rl.loss_agg``, see ``register_loss_agg``). Everything here is a function of tensors only, so each
step can be checked against hand-computed numbers; the model-facing code (forward passes, micro-batches,
optimizer) lives in ``memtrain.rl.update``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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


def writer_credit(match_adv: float, imr_parts: Sequence[tuple[float, int]], num_turns: int) -> list[float]:
    """Per-turn advantages of one E2E trajectory under ``rl.imr_credit=writer``.

    The trajectory's advantage splits into the part of its match reward and one part per IMR prompt it was
    asked (the bonus of that prompt), each ``R - mean(R)`` over the group: their sum is the broadcast
    advantage. Every turn gets the match part; an IMR part goes only to its ``writers`` first turns - the
    memory turns 1..k that wrote the memory m_k that prompt asked from. The final answer turn and later
    memory turns did not shape m_k. ``imr_parts``: (advantage, writers) per IMR prompt.
    """
    out = [match_adv] * num_turns
    for adv, writers in imr_parts:
        if not 0 <= writers <= num_turns:
            raise ValueError(f"writers={writers}: expected 0..num_turns ({num_turns})")
        for turn in range(writers):
            out[turn] += adv
    return out


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


# --- loss aggregation (rl.loss_agg): how much each token, sequence and session weighs ---------------------

@dataclass(frozen=True)
class AggTotals:
    """What an aggregation normalises by, counted over the WHOLE batch; None: this (micro-)batch's own.

    Whole-batch counts make the micro-batch losses sum to the full-batch loss exactly, so gradient
    accumulation (and data-parallel training) reproduces the full-batch gradient. ``session_size``: for each
    row of the batch at hand, the number of sequences in its session over the whole batch (``session_sizes``).
    """

    num_seqs: int | None = None
    num_tokens: int | None = None
    num_sessions: int | None = None
    session_size: Tensor | Sequence[int] | None = None


# (per-token loss [B, T], mask [B, T] as 0/1 in the loss's dtype, totals) -> scalar loss. Masked positions of
# the per-token loss hold arbitrary finite values: an aggregation must give them weight 0.
LossAggFn = Callable[[Tensor, Tensor, AggTotals], Tensor]

LOSS_AGGS: dict[str, LossAggFn] = {}


def register_loss_agg(name: str) -> Callable[[LossAggFn], LossAggFn]:
    """Make an aggregation selectable as ``rl.loss_agg=<name>`` (as verl's ``register_policy_loss``).

    The module that registers it must be imported before the config is validated (in every process of a
    data-parallel run). A name can be registered once, so a plug-in cannot silently replace a built-in.
    """

    def register(fn: LossAggFn) -> LossAggFn:
        if name in LOSS_AGGS:
            raise ValueError(f"loss aggregation {name!r} is already registered")
        LOSS_AGGS[name] = fn
        return fn

    return register


def get_loss_agg(name: str) -> LossAggFn:
    """The aggregation registered as ``name``, else a one-line error that lists the registered ones."""
    if name not in LOSS_AGGS:
        raise ValueError(f"unknown mode {name!r}; registered loss aggregations: {', '.join(LOSS_AGGS)}")
    return LOSS_AGGS[name]


def _seq_means(per_token: Tensor, mask: Tensor) -> Tensor:
    """L_i: the mean of each sequence's per-token loss over its unmasked tokens, [B]."""
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("aggregate: a sequence with no unmasked token cannot have a per-sequence mean")
    return (per_token * mask).sum(-1) / lengths


@register_loss_agg("seq_mean_token_mean")
def seq_mean_token_mean(per_token: Tensor, mask: Tensor, totals: AggTotals) -> Tensor:
    """Paper Eq. 4: sum_i L_i / num_seqs. Every sequence (E2E step or IMR sample) weighs the same, however
    long, so a trajectory with more chunks (more turns) weighs more."""
    n = per_token.shape[0] if totals.num_seqs is None else totals.num_seqs
    return _seq_means(per_token, mask).sum() / n


@register_loss_agg("token_mean")
def token_mean(per_token: Tensor, mask: Tensor, totals: AggTotals) -> Tensor:
    """The reference scripts: sum over all tokens / num_tokens. Long outputs weigh more."""
    n_tok = mask.sum() if totals.num_tokens is None else totals.num_tokens
    return (per_token * mask).sum() / n_tok


@register_loss_agg("session_mean")
def session_mean(per_token: Tensor, mask: Tensor, totals: AggTotals) -> Tensor:
    """sum_i L_i / session_size_i / num_sessions: the mean over sessions of the mean over each session's
    sequences, so every rollout (trajectory, IMR sample, search episode) weighs the same whatever its number
    of turns. Needs ``totals.session_size``."""
    if totals.session_size is None:
        raise ValueError("aggregate: mode 'session_mean' needs session_size (sequences per session)")
    seq_loss = _seq_means(per_token, mask)
    size = torch.as_tensor(totals.session_size, dtype=per_token.dtype, device=per_token.device)
    if size.shape != seq_loss.shape or bool((size < 1).any()):
        raise ValueError(f"aggregate: session_size must be [{seq_loss.shape[0]}] values >= 1, got "
                         f"{size.tolist()}")
    n_sessions = float((1.0 / size).sum()) if totals.num_sessions is None else totals.num_sessions
    return (seq_loss / size).sum() / n_sessions


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "seq_mean_token_mean",
              num_seqs_total: int | None = None, num_tokens_total: int | None = None,
              session_size: Tensor | Sequence[int] | None = None,
              num_sessions_total: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar with the registered aggregation ``mode`` (``LOSS_AGGS``).

    With L_i = the mean of sequence i's per-token loss: ``seq_mean_token_mean`` (the default, paper Eq. 4)
    averages the L_i, ``token_mean`` all tokens, ``session_mean`` the sessions' means of their L_i. The totals
    (see ``AggTotals``) default to this batch's own counts.
    """
    totals = AggTotals(num_seqs_total, num_tokens_total, num_sessions_total, session_size)
    return get_loss_agg(mode)(per_token, mask.to(per_token.dtype), totals)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, kl_coef: float, clip_low: float, clip_high: float, agg: str,
              totals: AggTotals = AggTotals(),
              tis_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective of docs/method.md Eq. 4: loss = pg_loss + kl_coef * kl.

    pg_loss: the PPO clipped ratio term (``clipped_policy_loss``), each token's term weighted by
    ``tis_weights`` when given (``truncated_is_weights``); kl: the k3 estimate of KL(pi || ref), only with
    ``ref_logp`` (needed when ``kl_coef > 0``). Both are aggregated with ``agg`` (``rl.loss_agg``) over
    ``totals``. Shapes as ``clipped_policy_loss``. Returns the differentiable loss and detached stats:
    pg_loss, kl (0 without a reference) and those of ``clipped_policy_loss``.
    """
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError(f"grpo_loss: kl_coef={kl_coef:g} needs ref_logp (the reference policy's log-probs)")
    agg_fn = get_loss_agg(agg)
    mask_f = mask.to(logp.dtype)
    pg_tokens, stats = clipped_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high)
    if tis_weights is not None:
        pg_tokens = pg_tokens * tis_weights
    pg_loss = agg_fn(pg_tokens, mask_f, totals)
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        kl = agg_fn(k3_kl(logp, ref_logp), mask_f, totals)
    loss = pg_loss + kl_coef * kl
    return loss, {**stats, "pg_loss": pg_loss.detach(), "kl": kl.detach()}
