"""One GRPO policy update on a batch of training sequences (docs/method.md section 4), read as the paper.

A training sequence is one model call - an E2E memory step, the final answer step or an IMR prompt - with the
completion the sampler produced and the advantage it was assigned (E2E: the trajectory's, broadcast to every
step; IMR: its own group's). ``policy_update`` turns a list of them into exactly one optimizer step:

1. plan micro-batches by a token budget (``memtrain.rl.logprobs.plan_update``; shared prefixes run once);
2. per micro-batch: reference log-probs (a frozen model, or the same peft model with its adapters disabled;
   skipped when ``kl_coef == 0``), the policy's log-probs with gradients (``memtrain.rl.logprobs``: float32,
   under the sampling temperature), the old log-probs (the sampler's when they agree with the recomputed
   ones, else the recomputed ones), the loss (``core.grpo_loss``: the clipped ratio term + k3 KL, aggregated
   by ``rl.loss_agg``) and a backward pass of the micro-batch's share of the GLOBALLY normalised loss, so the
   accumulated gradient equals the full-batch gradient exactly;
3. non-finite loss/gradient check (skip the step and zero the gradients), grad-norm clipping, the optimizer
   step (``memtrain.rl.optim.step_or_undo``: undone when it made a weight non-finite or moved the weights too
   far), scheduler step.

Top-p truncation cannot be recomputed, so training refuses ``rl.top_p < 1`` (``check_trainable_sampling``).
In bf16 the engine and the trainer may round differently, so their log-probs can differ slightly (logged as
old_logprob_* and mismatch_kl); ``rl.tis_cap`` corrects for it with truncated importance weights
(``core.truncated_is_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from memtrain.config import ConfigError, RLConfig
from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.rl.checkpoint import is_peft
from memtrain.rl.core import AggTotals, grpo_loss, session_sizes, truncated_is_weights
from memtrain.rl.distributed import DistContext
from memtrain.rl.logprobs import (
    Batch,
    MicroBatch,
    can_share_prompts,
    collate,
    device_dtype,
    forward_logprobs,
    plan_micro_batches,
    plan_update,
    training_mode,
)
from memtrain.rl.optim import (
    SNAPSHOT_MAX_BYTES,
    clip_gradients,
    optimizer_params,
    step_or_undo,
    warn_low_precision,
)
from memtrain.rl.rollout import TrainSequence
from memtrain.rl.update_stats import UpdateStats, batch_counts

# The module that computes reference log-probs (None: no KL term) and the context it runs in.
_Reference = tuple[torch.nn.Module | None, Any]


def _reference_context(model: torch.nn.Module, ref: torch.nn.Module | None, kl_coef: float) -> _Reference:
    """Which module computes reference log-probs, and the context it needs (adapters off for peft)."""
    if kl_coef == 0.0:
        return None, None
    if ref is None or ref is model:
        if not is_peft(model):
            raise UserError("rl.kl_coef > 0 needs a reference policy: pass ref=<a frozen copy of the "
                            "initial model>, use LoRA (model.lora) so the reference is the base model with "
                            "its adapters disabled, or set rl.kl_coef=0 to train without the KL term")
        return model, model.disable_adapter
    return ref, nullcontext


def check_trainable_sampling(cfg: RLConfig) -> None:
    """Refuse rollout settings whose sampling distribution the update cannot recompute.

    Top-p sampling draws from the renormalised nucleus; the update scores tokens under the full
    softmax(logits / T), so the PPO ratio and the KL would be those of another distribution (a biased update).
    """
    if cfg.top_p < 1.0:
        raise ConfigError(f"rl.top_p={cfg.top_p:g}: training needs rl.top_p=1.0 (the update scores tokens "
                          "under softmax(logits / rl.temperature) and cannot reproduce top-p truncation, so "
                          "the ratio and KL would be biased); lower rl.temperature instead (top-p is fine "
                          "for evaluation)")


# What a rank with fewer micro-batches than the others trains on under FSDP2, with zero weight.
_PADDING = (TrainSequence(prompt_ids=[0], completion_ids=[0], advantage=0.0),)



@dataclass(frozen=True)
class _Pass:
    """One forward/backward pass: ``rows`` of ``seqs``, and the totals its loss is normalised by (the whole
    batch's counts, each row's session size)."""

    seqs: Sequence[TrainSequence]
    rows: list[int]
    totals: AggTotals
    shared: int = 0

    @property
    def padding(self) -> bool:
        return self.seqs is _PADDING

    @property
    def items(self) -> list[TrainSequence]:
        return [self.seqs[i] for i in self.rows]


def _plan_passes(seqs: Sequence[TrainSequence], plan: list[MicroBatch], totals: tuple[int, int, int],
                 passes: int | None) -> list[_Pass]:
    """One pass per planned micro-batch, then (FSDP2) zero-weight padding passes up to ``passes``."""
    if passes is not None and passes < len(plan):
        raise ValueError(f"passes={passes} is fewer than the {len(plan)} micro-batches of this batch")
    num_seqs, num_tokens, sessions = totals
    norm = AggTotals(num_seqs=num_seqs, num_tokens=num_tokens, num_sessions=sessions)
    sizes = session_sizes([s.session for s in seqs])  # sequences per session, over this whole (local) batch
    work = [_Pass(seqs, m.rows, replace(norm, session_size=[sizes[i] for i in m.rows]), m.shared)
            for m in plan]
    return work + [_Pass(_PADDING, [0], replace(norm, session_size=[1]))] * ((passes or 0) - len(plan))


def _check_sampler_logprobs(seqs: Sequence[TrainSequence], cfg: RLConfig) -> None:
    if cfg.old_logprobs != "sampler":
        return
    missing = [i for i, s in enumerate(seqs) if s.old_logprobs is None]
    if missing:
        raise UserError(f"rl.old_logprobs='sampler' but {len(missing)} sequence(s) have no old_logprobs "
                        f"(first: index {missing[0]}, group {seqs[missing[0]].group!r}); use 'auto' or "
                        "'recompute', or fill them with sequence_logprobs before the update")


def _reference_logprobs(model: torch.nn.Module, reference: _Reference, batch: Batch,
                        temperature: float) -> Tensor | None:
    """The reference policy's log-probs of the batch (None without a KL term), on the policy's device."""
    ref_model, ref_ctx = reference
    if ref_model is None:
        return None
    device, _ = device_dtype(model)
    # a separate reference runs in eval mode (no dropout); the peft policy keeps its mode
    with torch.no_grad(), ref_ctx(), training_mode(ref_model, ref_model.training and ref_model is model):
        return forward_logprobs(ref_model, batch, temperature)[0].to(device)


def _old_logprobs(batch: Batch, items: Sequence[TrainSequence], current: Tensor, cfg: RLConfig,
                  stats: UpdateStats) -> tuple[Tensor, Tensor | None]:
    """The PPO old log-probs of a micro-batch (``rl.old_logprobs``) and its truncated IS weights, if any.

    Decided per sequence, so the gradient does not depend on which sequences share a micro-batch: the
    sampler's where the sequence carries them and 'sampler' says so or 'auto' finds them within
    ``rl.old_logprob_tol`` of ``current`` (its recomputed ones), else ``current``; then, with ``rl.tis_cap``,
    a recomputed sequence's ratio no longer sees the sampler, so each of its tokens is reweighted by
    min(trainer / sampler, cap) (1 on the sequences that use the sampler's).
    """
    sampler = [s.old_logprobs for s in items]
    if any(lp is None for lp in sampler):
        return current, None
    sampler_logp = batch.scatter(sampler, batch.mask.device)  # type: ignore[arg-type]
    gap = stats.add_sampler_diff(sampler_logp, current, batch.mask)  # [B]: each sequence's largest gap
    use_sampler = gap <= cfg.old_logprob_tol if cfg.old_logprobs == "auto" else torch.full_like(
        gap, cfg.old_logprobs == "sampler", dtype=torch.bool)
    stats.sampler_seqs += int(use_sampler.sum())
    old = torch.where(use_sampler[:, None], sampler_logp, current)
    if cfg.tis_cap is None or bool(use_sampler.all()):
        return old, None
    recomputed = batch.mask & ~use_sampler[:, None]
    weights, tis_stats = truncated_is_weights(current, sampler_logp, recomputed, cfg.tis_cap)
    stats.add_tis(tis_stats, recomputed)
    return old, torch.where(use_sampler[:, None], batch.mask.to(weights.dtype), weights)


def _micro_batch_loss(model: torch.nn.Module, reference: _Reference, cfg: RLConfig, work: _Pass,
                      stats: UpdateStats) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's share of the full-batch GRPO loss (differentiable) and its stats (``grpo_loss``'s
    plus entropy_sum: its tokens' summed policy entropy)."""
    batch = collate(work.seqs, work.rows, device_dtype(model)[0], work.shared)
    items = work.items
    ref_logp = _reference_logprobs(model, reference, batch, cfg.temperature)
    logp, entropy = forward_logprobs(model, batch, cfg.temperature, with_entropy=True)
    old_logp, tis_weights = _old_logprobs(batch, items, logp.detach(), cfg, stats)
    adv = torch.tensor([s.advantage for s in items], dtype=torch.float32, device=batch.mask.device)
    loss, loss_stats = grpo_loss(logp, old_logp, adv, batch.mask, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
                                 clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg,
                                 totals=work.totals, tis_weights=tis_weights)
    assert entropy is not None
    return loss, {**loss_stats, "entropy_sum": (entropy * batch.mask.float()).sum()}


def _warn_sampler_gap(stats: UpdateStats, cfg: RLConfig, num_seqs: int) -> None:
    # (in 'sampler' mode a difference is expected: the policy may have moved since sampling)
    if stats.diff_tokens and stats.diff_max > cfg.old_logprob_tol and cfg.old_logprobs != "sampler":
        logger.warning("sampler log-probs differ from the recomputed ones by up to %.4g (tolerance %.4g): "
                       "prompts/tokens not exactly what was sampled, or numeric precision; "
                       "old log-probs source: %s", stats.diff_max, cfg.old_logprob_tol,
                       stats.old_logprob_source(num_seqs))


def accumulate_policy_gradients(model: torch.nn.Module, seqs: Sequence[TrainSequence], cfg: RLConfig,
                                ref: torch.nn.Module | None = None,
                                totals: tuple[int, int, int] | None = None,
                                passes: int | None = None,
                                skip_zero_adv: bool = True) -> dict[str, float | str]:
    """Forward/backward every micro-batch, accumulating into ``.grad`` the gradient of the full-batch loss.

    Does not zero existing gradients and does not step. The loss is ``core.grpo_loss`` (clipped pg term +
    kl_coef * k3 KL) aggregated with ``cfg.loss_agg`` over the WHOLE batch (global sequence/token/session
    counts), so the sum over micro-batches is the full-batch loss whatever the micro-batch plan. Returns
    ``UpdateStats.finalise``'s stats; stops early with loss=nan when a micro-batch loss is not finite.
    ``totals``: the (sequences, tokens, sessions) to normalise by when ``seqs`` is one rank's share of a
    data-parallel batch (``memtrain.rl.distributed``); default: this batch's own. Sessions never straddle
    ranks (whole rows are sharded), so each sequence's session size is known locally. ``passes`` (FSDP2,
    where every forward/backward is a collective that all ranks must join): run exactly this many
    forward/backward passes, those beyond this rank's micro-batches on a one-token dummy sequence with a
    zero-weight loss, and do not stop at a non-finite loss (loss=nan all the same; the caller skips the step).
    ``skip_zero_adv``: leave out the passes of sequences that cannot change the gradient
    (:func:`contributing`); the gradient is the same, the token statistics are over the sequences trained on.
    """
    check_trainable_sampling(cfg)
    _check_sampler_logprobs(seqs, cfg)
    reference = _reference_context(model, ref, cfg.kl_coef)
    share = cfg.share_prompts and passes is None and can_share_prompts(model)  # FSDP2: one forward per pass
    active = contributing(seqs, cfg.kl_coef) if skip_zero_adv and passes is None else list(range(len(seqs)))
    plan = plan_update([seqs[i].prompt_ids for i in active], [len(seqs[i].completion_ids) for i in active],
                       cfg.micro_batch_tokens, share)
    plan = [replace(m, rows=[active[r] for r in m.rows]) for m in plan]
    stats = UpdateStats()
    for work in _plan_passes(seqs, plan, totals if totals is not None else batch_counts(seqs), passes):
        loss, loss_stats = _micro_batch_loss(model, reference, cfg, work, stats)
        if work.padding:
            loss = loss * 0.0  # the collectives of a real pass, nothing added to the gradient
        if not torch.isfinite(loss):
            stats.finite = False
            logger.warning("non-finite policy loss in a micro-batch of %d sequence(s) (groups %s); skipping "
                           "this update", len(work.rows), sorted({s.group for s in work.items})[:5])
            if passes is None:
                break
        loss.backward()
        if stats.finite and not work.padding:
            stats.add_loss(loss, loss_stats)
    trained = [seqs[i] for i in active]
    _warn_sampler_gap(stats, cfg, len(trained))
    skipped = float(len(seqs) - len(trained))
    return {**stats.finalise(trained, len(plan)), "num_seqs_zero_adv_skipped": skipped}


def contributing(seqs: Sequence[TrainSequence], kl_coef: float) -> list[int]:
    """Indices of the sequences whose forward/backward can change the gradient. Without a KL term a sequence
    with advantage exactly 0 adds nothing (its clipped policy term is 0 * ratio): it only counts in the
    loss's normalisation, which the caller's totals keep. Such sequences are common - a trajectory whose
    reward equals its group's mean, the turns ``rl.imr_credit=writer`` gives no IMR credit while every match
    was equal - and skipping them gives the same gradient for less compute."""
    everything = list(range(len(seqs)))
    if kl_coef > 0:
        return everything
    # a batch of zero advantages only still runs, so that its (zero) gradients exist: AdamW steps on a zero
    # gradient (its moments carry on), and skips a parameter without one
    return [i for i, s in enumerate(seqs) if s.advantage != 0.0] or everything


def _fsdp_passes(seqs: Sequence[TrainSequence], cfg: RLConfig, dp: DistContext | None) -> int | None:
    """FSDP2: every rank runs as many forward/backward passes as the rank with the most micro-batches."""
    if dp is None or not dp.fsdp:
        return None
    return dp.max_int(len(plan_micro_batches([s.length for s in seqs], cfg.micro_batch_tokens)))


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seqs: Sequence[TrainSequence],
                  cfg: RLConfig, ref: torch.nn.Module | None = None,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                  grad_clip: float | None = 1.0, dp: DistContext | None = None,
                  snapshot_max_bytes: int | None = SNAPSHOT_MAX_BYTES,
                  max_update_ratio: float | None = None) -> dict[str, float | str]:
    """Exactly one optimizer step of the GRPO objective on ``seqs``; returns stats for logging.

    ``ref``: the frozen reference policy for the KL term; None with a peft model = the same model with its
    adapters disabled; ignored (no reference pass at all) when ``cfg.kl_coef == 0``.
    Old log-probs (``cfg.old_logprobs``): 'recompute' = the policy's own log-probs from this very forward pass
    (exact when this is the first update since sampling: ratio 1, no extra pass); 'sampler' = each sequence's
    ``old_logprobs`` (needed for a second update on the same rollout batch); 'auto' = the sampler's, per
    micro-batch, where all are present and within ``cfg.old_logprob_tol`` of the recomputed ones, else
    recomputed. ``cfg.tis_cap``: where the old log-probs are recomputed and the sampler's are known, each
    token's clipped term is weighted by min(exp(recomputed - sampler), tis_cap) (truncated IS, as verl).
    Returns the stats of ``UpdateStats.finalise`` (but nonfinite_loss), grad_norm (before clipping), lr (the
    one used), update_ratio (||delta theta|| / ||theta|| of the step), skipped_nonfinite (1.0: no step was
    taken, or it was undone, and the gradients were zeroed), nonfinite_params (1.0: the step made a weight
    non-finite and was undone from a copy, see SNAPSHOT_MAX_BYTES; without a copy
    :class:`NonFiniteParamsError` is raised), skipped_exploded (1.0: the step moved the weights by more than
    ``max_update_ratio`` of their norm (``optim.max_update_ratio``) and was undone likewise) and
    skipped_empty (1.0: an empty ``seqs``, e.g. all groups filtered; no step).

    ``dp`` (data-parallel training, ``memtrain.rl.distributed``): ``seqs`` is this rank's share; the loss is
    normalised by the whole batch's totals and the gradients are summed over ranks before clipping, so all
    ranks take the same step (the stats stay this rank's; ``reduce_update_stats`` combines them). Under FSDP2
    every rank runs as many forward/backward passes as the rank with the most micro-batches.
    """
    params, lr = optimizer_params(optimizer), float(optimizer.param_groups[0]["lr"])
    # --- data-parallel (memtrain.rl.distributed): global totals; the step is skipped only if ALL are empty
    totals = dp.totals(seqs) if dp is not None else None
    if (not seqs and dp is None) or (totals is not None and totals[0] == 0):
        return {"loss": 0.0, "num_seqs": 0.0, "num_tokens": 0.0, "skipped_empty": 1.0,
                "skipped_nonfinite": 0.0, "nonfinite_params": 0.0, "skipped_exploded": 0.0, "lr": lr,
                "old_logprob_source": "none"}
    passes = _fsdp_passes(seqs, cfg, dp)
    warn_low_precision(params, lr)
    optimizer.zero_grad(set_to_none=True)
    with training_mode(model, True):
        stats = accumulate_policy_gradients(model, seqs, cfg, ref, totals=totals, passes=passes)
    finite = stats.pop("nonfinite_loss") == 0.0
    if dp is not None:  # --- data-parallel: sum the gradients; a non-finite loss on any rank skips everywhere
        finite = dp.reduce_gradients(params, finite=finite)
    grad_norm = clip_gradients(params, grad_clip) if finite else math.nan
    kept, why, ratio = True, "", math.nan
    if math.isfinite(grad_norm):
        kept, why, ratio = step_or_undo(optimizer, params, dp, snapshot_max_bytes, max_update_ratio)
    skipped = not math.isfinite(grad_norm) or not kept
    if not skipped and scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats.update(grad_norm=grad_norm, lr=lr, update_ratio=ratio, skipped_nonfinite=1.0 if skipped else 0.0,
                 nonfinite_params=1.0 if why == "nonfinite" else 0.0,
                 skipped_exploded=1.0 if why == "exploded" else 0.0, skipped_empty=0.0)
    return stats
