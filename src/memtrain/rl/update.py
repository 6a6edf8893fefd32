"""One GRPO policy update on a batch of training sequences (docs/method.md section 4).

A training sequence is one model call: a prompt (an E2E memory step, the final answer step, or an IMR prompt)
and the completion the sampler produced for it, with the advantage it was assigned (E2E: the trajectory's,
broadcast to every step; IMR: its own group's). ``policy_update`` turns a list of them into exactly one
optimizer step:

1. plan micro-batches by a token budget (``plan_update``): sequences that share one prompt (the G2 IMR answers
   to one memory, the first memory turns of a row's G1 trajectories) run as the prompt once and their
   completions on its KV cache (``rl.share_prompts``: same log-probs and gradients, (n - 1) x prompt fewer
   tokens), the rest right-padded together (``plan_micro_batches``);
2. per micro-batch: reference log-probs (a frozen model, or the same peft model with its adapters disabled;
   skipped when ``kl_coef == 0``), then the policy forward with gradients, the old log-probs (the sampler's
   when they agree with the recomputed ones, else the recomputed ones), the loss (``core.grpo_loss``: the
   clipped ratio term + k3 KL, aggregated by ``rl.loss_agg``) and a backward pass of the micro-batch's share
   of the GLOBALLY normalised loss, so that the accumulated gradient equals the full-batch gradient exactly;
3. non-finite loss/gradient check (skip the step and zero the gradients), grad-norm clipping, optimizer
   step, non-finite parameter check (undo the step from a copy taken before it), scheduler step.

Log-probs are computed in float32 under the SAMPLING distribution softmax(logits / rl.temperature) of the
completion positions only (``logits_to_keep``), the matmuls under autocast to the model's compute dtype
(``model.compute_dtype``, ``memtrain.precision``: bf16 over float32 master weights where the device has fast
bf16, CPU or GPU): the policy, the old log-probs and the KL reference alike (as verl's actor and TRL's
GRPOTrainer divide the logits by the rollout temperature, also for the reference). That is what the engines
report (``Completion.logprobs``), so the importance ratio is exactly 1 on the first update after sampling at
any temperature (and the same compute dtype). Top-p truncation cannot be recomputed here, so training
refuses ``rl.top_p < 1`` (``check_trainable_sampling``). In bf16 the engine and the trainer may round
differently, so their log-probs can differ slightly (logged as old_logprob_* and mismatch_kl);
``rl.tis_cap`` corrects for it with truncated importance weights (``core.truncated_is_weights``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from memtrain.agent.types import TURN_KINDS
from memtrain.config import ConfigError, RLConfig
from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.precision import autocast_for
from memtrain.rl.core import AggTotals, grpo_loss, num_sessions, session_sizes, truncated_is_weights
from memtrain.rl.distributed import DistContext
from memtrain.rl.rollout import HasTokens, TrainSequence

KINDS = TURN_KINDS


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices so each micro-batch's PADDED size (rows x longest row) stays <= max_tokens.

    Sorted longest first and packed greedily, so rows of a micro-batch have similar lengths (little padding).
    A sequence longer than the budget on its own gets a micro-batch of its own (it cannot be split).
    Deterministic; every index appears exactly once.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: expected > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if lengths[i] <= 0:
            raise ValueError(f"lengths[{i}]: expected > 0, got {lengths[i]}")
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class MicroBatch:
    """The sequence indices of one forward/backward pass; ``shared_prompt``: they all have one prompt, run
    once, and their completions run on its KV cache."""

    rows: list[int]
    shared_prompt: bool = False


def plan_update(prompts: Sequence[Sequence[int]], completion_lengths: Sequence[int], max_tokens: int,
                share_prompts: bool = True) -> list[MicroBatch]:
    """The micro-batches of one update: with ``share_prompts``, sequences whose prompt another one repeats
    go in shared-prompt micro-batches (cost: the prompt once + rows x the longest completion, kept <=
    ``max_tokens``, longest completions first); the rest, and a group's single leftover, right-padded by
    ``plan_micro_batches``. Deterministic; every index appears exactly once."""
    if len(prompts) != len(completion_lengths):
        raise ValueError(f"{len(prompts)} prompts but {len(completion_lengths)} completion lengths")
    lengths = [len(p) + n for p, n in zip(prompts, completion_lengths, strict=True)]
    if not share_prompts:
        return [MicroBatch(rows) for rows in plan_micro_batches(lengths, max_tokens)]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    shared: list[MicroBatch] = []
    rest: list[int] = []

    def close(rows: list[int]) -> None:
        if len(rows) > 1:
            shared.append(MicroBatch(rows, shared_prompt=True))
        else:
            rest.extend(rows)

    for prompt, members in by_prompt.items():
        rows: list[int] = []
        for i in sorted(members, key=lambda i: (-completion_lengths[i], i)):
            if rows and len(prompt) + (len(rows) + 1) * completion_lengths[rows[0]] > max_tokens:
                close(rows)
                rows = []
            rows.append(i)
        close(rows)
    rest.sort()
    padded = plan_micro_batches([lengths[i] for i in rest], max_tokens) if rest else []
    return shared + [MicroBatch([rest[j] for j in rows]) for rows in padded]


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@dataclass
class _Batch:
    """A right-padded micro-batch plus the completion-token frame the logits are kept for.

    Column j of ``labels``/``mask`` is input position ``start + j``'s NEXT token, so logits kept for the last
    ``keep`` positions line up with it.
    """

    rows: list[int]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # [B, keep]
    mask: Tensor  # [B, keep] bool: True on completion tokens
    start: int
    offsets: list[int]  # column of each row's first completion token
    shared_prompt: bool = False  # every row has the same prompt (input_ids[:, :start + 1])

    @property
    def keep(self) -> int:
        return int(self.labels.shape[1])

    def scatter(self, per_seq: Sequence[Sequence[float]], device: torch.device) -> Tensor:
        """Place per-sequence completion-token values into the [B, keep] frame (0 elsewhere)."""
        out = torch.zeros(self.labels.shape, dtype=torch.float32)
        for b, values in enumerate(per_seq):
            off = self.offsets[b]
            out[b, off: off + len(values)] = torch.as_tensor(values, dtype=torch.float32)
        return out.to(device)

    def gather(self, frame: Tensor) -> list[Tensor]:
        """The inverse of ``scatter``: per-row completion-token values as CPU float32 tensors."""
        out = []
        lengths = self.mask.sum(-1).tolist()
        for b in range(frame.shape[0]):
            out.append(frame[b, self.offsets[b]: self.offsets[b] + int(lengths[b])].detach().float().cpu())
        return out


def _collate(seqs: Sequence[HasTokens], rows: list[int], device: torch.device,
             shared_prompt: bool = False) -> _Batch:
    items = [seqs[i] for i in rows]
    total = max(len(s.prompt_ids) + len(s.completion_ids) for s in items)
    start = min(len(s.prompt_ids) for s in items) - 1
    keep = total - start
    input_ids = torch.zeros(len(items), total, dtype=torch.long)
    attention = torch.zeros(len(items), total, dtype=torch.long)
    labels = torch.zeros(len(items), keep, dtype=torch.long)
    mask = torch.zeros(len(items), keep, dtype=torch.bool)
    offsets = []
    for b, s in enumerate(items):
        ids = list(s.prompt_ids) + list(s.completion_ids)
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[b, : len(ids)] = 1
        off = len(s.prompt_ids) - 1 - start
        n = len(s.completion_ids)
        labels[b, off: off + n] = torch.tensor(list(s.completion_ids), dtype=torch.long)
        mask[b, off: off + n] = True
        offsets.append(off)
    return _Batch(rows, input_ids.to(device), attention.to(device), labels.to(device), mask.to(device), start,
                  offsets, shared_prompt)


def _logits(model: torch.nn.Module, batch: _Batch, device: torch.device) -> Tensor:
    """The [B, keep, vocab] logits of ``batch``: one right-padded forward, or (a shared prompt) the prompt
    once, its KV cache repeated per row, and every row's completion on it; gradients flow through the cache
    into the prompt's forward, so they equal the padded forward's."""
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    with autocast_for(model):
        if not batch.shared_prompt:
            return model(input_ids=ids, attention_mask=attention, logits_to_keep=batch.keep,
                         use_cache=False).logits
        prompt = batch.start + 1
        head = model(input_ids=ids[:1, :prompt], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise UserError(f"rl.share_prompts: {type(model).__name__} returned no repeatable KV cache "
                            "(transformers' Cache); set rl.share_prompts=false")
        cache.batch_repeat_interleave(ids.shape[0])
        tail = model(input_ids=ids[:, prompt:], attention_mask=attention, past_key_values=cache,
                     use_cache=True)
    return torch.cat([head.logits.expand(ids.shape[0], -1, -1), tail.logits], dim=1)


def _forward_logprobs(model: torch.nn.Module, batch: _Batch, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log p(label) [B, keep] under softmax(logits / temperature), in float32 (differentiable when
    grad is on), and optional entropies of that same tempered distribution (as verl reports them)."""
    device, _ = _device_dtype(model)  # a reference model may live on another device than the batch
    logits = _logits(model, batch, device).float()
    if logits.shape[1] != batch.keep:
        raise RuntimeError(f"the model returned logits for {logits.shape[1]} positions, expected "
                           f"{batch.keep}: it must support transformers' logits_to_keep argument")
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    labels, mask = batch.labels.to(device), batch.mask.to(device)
    logp = logits.gather(-1, labels[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.zeros_like(lse)
            rows, cols = mask.nonzero(as_tuple=True)
            for s in range(0, rows.numel(), 2048):  # chunked: a [tokens, vocab] softmax can be large
                r, c = rows[s: s + 2048], cols[s: s + 2048]
                lg = logits[r, c].detach()
                p = torch.softmax(lg, dim=-1)
                entropy[r, c] = lse[r, c].detach() - (p * lg).sum(-1)
    return logp * mask, entropy


@contextmanager
def _mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def sequence_logprobs(model: torch.nn.Module, seqs: Sequence[HasTokens], micro_batch_tokens: int,
                      temperature: float = 1.0, share_prompts: bool = True) -> list[Tensor]:
    """Per-completion-token log-probs (CPU float32, one tensor per sequence, input order), no gradient.

    Runs in eval mode (no dropout) in padded micro-batches of at most ``micro_batch_tokens`` tokens. Use it to
    recompute old log-probs before the first of several updates on one rollout batch, or to check an engine.
    ``temperature`` divides the logits: pass the rollout's (``rl.temperature``) to get what the engines
    report for tokens sampled at that temperature and what the update uses. ``share_prompts``: as
    ``rl.share_prompts`` (a prompt several sequences share runs once).
    """
    passes = _no_grad_passes(model, seqs, micro_batch_tokens, temperature, False, share_prompts)
    return [lp for lp, _ in passes]


def sequence_logprobs_and_entropy(model: torch.nn.Module, seqs: Sequence[HasTokens], micro_batch_tokens: int,
                                  temperature: float = 1.0) -> tuple[list[Tensor], list[Tensor]]:
    """``sequence_logprobs`` plus the policy's per-token entropy (nats) at each completion position."""
    pairs = _no_grad_passes(model, seqs, micro_batch_tokens, temperature, True)
    return [lp for lp, _ in pairs], [ent for _, ent in pairs]


def _no_grad_passes(model: torch.nn.Module, seqs: Sequence[HasTokens], micro_batch_tokens: int,
                    temperature: float, with_entropy: bool,
                    share: bool = True) -> list[tuple[Tensor, Tensor]]:
    device, _ = _device_dtype(model)
    out: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(seqs)
    plan = plan_update([s.prompt_ids for s in seqs], [len(s.completion_ids) for s in seqs],
                       micro_batch_tokens, share and _can_share_prompts(model))
    with torch.no_grad(), _mode(model, False):
        for micro in plan:
            batch = _collate(seqs, micro.rows, device, micro.shared_prompt)
            logp, ent = _forward_logprobs(model, batch, temperature, with_entropy)
            lps = batch.gather(logp)
            ents = batch.gather(ent) if ent is not None else [torch.empty(0)] * len(micro.rows)
            for b, i in enumerate(micro.rows):
                out[i] = (lps[b], ents[b])
    return out


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# The module that computes reference log-probs (None: no KL term) and the context it runs in.
_Reference = tuple[torch.nn.Module | None, Any]


def _reference_context(model: torch.nn.Module, ref: torch.nn.Module | None, kl_coef: float) -> _Reference:
    """Which module computes reference log-probs, and the context it needs (adapters off for peft)."""
    if kl_coef == 0.0:
        return None, None
    if ref is None or ref is model:
        if not _is_peft(model):
            raise UserError("rl.kl_coef > 0 needs a reference policy: pass ref=<a frozen copy of the "
                            "initial model>, use LoRA (model.lora) so the reference is the base model with "
                            "its adapters disabled, or set rl.kl_coef=0 to train without the KL term")
        return model, model.disable_adapter
    return ref, nullcontext


_warned_low_precision: set[int] = set()


def _warn_low_precision(params: list[torch.nn.Parameter], lr: float) -> None:
    """bf16/fp16 trainable weights silently drop updates below their resolution (lr ~1e-6): say so once."""
    low = {str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)}
    if low and id(params[0]) not in _warned_low_precision:
        _warned_low_precision.add(id(params[0]))
        logger.warning("trainable weights are %s: AdamW steps of size lr=%g are mostly below their "
                       "resolution and get rounded away; load the policy in float32 (model.dtype=float32) "
                       "and let model.compute_dtype run the matmuls in bf16", "/".join(sorted(low)), lr)


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
        num_seqs, num_tokens, sessions = _batch_counts(seqs)
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
            **{f"num_seqs_{k}": float(sum(1 for s in seqs if s.kind == k)) for k in KINDS},
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


def _batch_counts(seqs: Sequence[TrainSequence]) -> tuple[int, int, int]:
    """(sequences, completion tokens, sessions) of a batch: what its loss is normalised by."""
    return len(seqs), sum(len(s.completion_ids) for s in seqs), num_sessions([s.session for s in seqs])


@dataclass(frozen=True)
class _Pass:
    """One forward/backward pass: ``rows`` of ``seqs``, and the totals its loss is normalised by (the whole
    batch's counts, each row's session size)."""

    seqs: Sequence[TrainSequence]
    rows: list[int]
    totals: AggTotals
    shared_prompt: bool = False

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
    work = [_Pass(seqs, m.rows, replace(norm, session_size=[sizes[i] for i in m.rows]), m.shared_prompt)
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


def _reference_logprobs(model: torch.nn.Module, reference: _Reference, batch: _Batch,
                        temperature: float) -> Tensor | None:
    """The reference policy's log-probs of the batch (None without a KL term), on the policy's device."""
    ref_model, ref_ctx = reference
    if ref_model is None:
        return None
    device, _ = _device_dtype(model)
    # a separate reference runs in eval mode (no dropout); the peft policy keeps its mode
    with torch.no_grad(), ref_ctx(), _mode(ref_model, ref_model.training and ref_model is model):
        return _forward_logprobs(ref_model, batch, temperature)[0].to(device)


def _old_logprobs(batch: _Batch, items: Sequence[TrainSequence], current: Tensor, cfg: RLConfig,
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
    batch = _collate(work.seqs, work.rows, _device_dtype(model)[0], work.shared_prompt)
    items = work.items
    ref_logp = _reference_logprobs(model, reference, batch, cfg.temperature)
    logp, entropy = _forward_logprobs(model, batch, cfg.temperature, with_entropy=True)
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
    share = cfg.share_prompts and passes is None and _can_share_prompts(model)  # FSDP2: one forward per pass
    active = contributing(seqs, cfg.kl_coef) if skip_zero_adv and passes is None else list(range(len(seqs)))
    plan = plan_update([seqs[i].prompt_ids for i in active], [len(seqs[i].completion_ids) for i in active],
                       cfg.micro_batch_tokens, share)
    plan = [replace(m, rows=[active[r] for r in m.rows]) for m in plan]
    stats = UpdateStats()
    for work in _plan_passes(seqs, plan, totals if totals is not None else _batch_counts(seqs), passes):
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


def _can_share_prompts(model: torch.nn.Module) -> bool:
    """A transformers model (peft-wrapped or not), so it returns the KV cache a shared prompt's completions
    run on, without gradient checkpointing (which drops that cache in training; the flag was renamed)."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    on = getattr(model, "is_activation_checkpointing", None)
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)
    return isinstance(base, PreTrainedModel) and not checkpointing


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# Finite gradients do not guarantee finite weights: a huge (finite) lr, or AdamW's normalised step on a weight
# already near the float limit, overflows. The step is undone from a copy of the trainable state (weights +
# optimizer moments) taken just before it: free for LoRA, but for full fine-tuning it doubles that state's
# memory, so above this many bytes no copy is kept and such a step stops the run instead
# (:class:`NonFiniteParamsError`) before anything is saved; the last checkpoint stays good either way. (The
# update cannot be predicted from lr * grad: AdamW normalises the gradient, so only the result tells.)
SNAPSHOT_MAX_BYTES = 2 * 1024**3


class NonFiniteParamsError(RuntimeError):
    """The optimizer step made a weight non-finite and no copy was kept to undo it (SNAPSHOT_MAX_BYTES)."""


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: Tensor) -> int:
    return _local(t).numel() * _local(t).element_size()


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element is finite, with one device sync: the max-abs norm is inf/nan exactly when some
    element is (unlike the 2-norm, it cannot overflow on large finite weights)."""
    local = [_local(t).detach() for t in tensors if _local(t).numel()]
    if not local:
        return True
    norms = torch._foreach_norm(local, math.inf)
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


@dataclass
class _Snapshot:
    """Copies of the stepped weights and of the optimizer state, to undo one optimizer step exactly."""

    params: list[torch.nn.Parameter]
    values: list[Tensor]
    state: dict[Any, dict[str, Any]]

    @classmethod
    def take(cls, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             max_bytes: int | None) -> _Snapshot | None:
        size = sum(_nbytes(p) for p in params) + sum(
            _nbytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor))
        if max_bytes is not None and size > max_bytes:
            return None
        state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                     for k, v in st.items()} for p, st in optimizer.state.items()}
        return cls(params, [p.detach().clone() for p in params], state)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values, strict=True):
                p.copy_(v)
        for p in [p for p in optimizer.state if p not in self.state]:  # state the step created
            del optimizer.state[p]
        for p, st in self.state.items():
            optimizer.state[p] = st


def _clip_gradients(params: list[torch.nn.Parameter], grad_clip: float | None) -> float:
    """Clip the gradients' global norm to ``grad_clip`` (None: no clipping); returns the norm before."""
    max_norm = grad_clip if grad_clip is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: a DTensor
    if not math.isfinite(grad_norm):
        logger.warning("non-finite gradient norm (%s); skipping this update", grad_norm)
    return grad_norm


def _norm(tensors: Sequence[Tensor]) -> float:
    """The global 2-norm of this rank's (local shards of the) tensors, in float64."""
    local = [_local(t).detach() for t in tensors if _local(t).numel()]
    if not local:
        return 0.0
    return math.sqrt(sum(float(n.double()) ** 2 for n in torch._foreach_norm(local, 2.0)))


def _update_ratio(stepped: list[torch.nn.Parameter], before: float, snapshot: _Snapshot | None) -> float:
    """||theta_new - theta_old|| / ||theta_old|| of one step; without a copy of the old weights, the lower
    bound | ||theta_new|| - ||theta_old|| | / ||theta_old|| (an explosion still shows in it)."""
    if snapshot is not None:  # one parameter's difference at a time: never a second copy of all the weights
        delta = math.sqrt(sum(_norm([_local(p).detach() - _local(v)]) ** 2
                              for p, v in zip(stepped, snapshot.values, strict=True)))
    else:
        delta = abs(_norm(stepped) - before)
    return delta / before if before > 0 else math.inf if delta > 0 else 0.0


def _step_or_undo(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], dp: DistContext | None,
                  snapshot_max_bytes: int | None, max_update_ratio: float | None = None
                  ) -> tuple[bool, str, float]:
    """Take the optimizer step, and undo it if it made a weight non-finite or moved the weights by more than
    ``max_update_ratio`` of their norm; returns (kept, why not: 'nonfinite', 'exploded' or '', the ratio)."""
    stepped = [p for p in params if p.grad is not None]
    snapshot = _Snapshot.take(stepped, optimizer, snapshot_max_bytes)
    before = _norm(stepped)
    ratio = math.nan
    try:
        optimizer.step()
        finite = _all_finite(stepped)
    except RuntimeError as exc:  # torch's own overflow check on a huge lr, after the moments moved
        if "overflow" not in str(exc):
            if snapshot is not None:
                snapshot.restore(optimizer)
            raise
        finite = False
    if finite:
        ratio = _update_ratio(stepped, before, snapshot)
    exploded = finite and max_update_ratio is not None and not ratio <= max_update_ratio
    if dp is not None:  # FSDP2: each rank checked its own shards; all ranks undo (or keep) the step
        finite = dp.max_int(0 if finite else 1) == 0
        exploded = finite and dp.max_int(1 if exploded else 0) == 1
    if finite and not exploded:
        return True, "", ratio
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    what = ("made some weights non-finite" if not finite else
            f"moved the weights by {ratio:.3g} of their norm (optim.max_update_ratio {max_update_ratio:g})")
    if snapshot is None:
        size, limit = sum(_nbytes(p) for p in stepped) / 2**30, (snapshot_max_bytes or 0) / 2**30
        raise NonFiniteParamsError(
            f"the optimizer step (lr {lr:g}) {what}, and no copy was kept to undo it (trainable state above "
            f"{limit:g} GiB, weights alone {size:.2f} GiB); lower optim.lr")
    snapshot.restore(optimizer)
    logger.warning("the optimizer step (lr %g) %s; undone, skipping this update", lr, what)
    return False, "nonfinite" if not finite else "exploded", ratio


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
    params, lr = _optimizer_params(optimizer), float(optimizer.param_groups[0]["lr"])
    # --- data-parallel (memtrain.rl.distributed): global totals; the step is skipped only if ALL are empty
    totals = dp.totals(seqs) if dp is not None else None
    if (not seqs and dp is None) or (totals is not None and totals[0] == 0):
        return {"loss": 0.0, "num_seqs": 0.0, "num_tokens": 0.0, "skipped_empty": 1.0,
                "skipped_nonfinite": 0.0, "nonfinite_params": 0.0, "skipped_exploded": 0.0, "lr": lr,
                "old_logprob_source": "none"}
    passes = _fsdp_passes(seqs, cfg, dp)
    _warn_low_precision(params, lr)
    optimizer.zero_grad(set_to_none=True)
    with _mode(model, True):
        stats = accumulate_policy_gradients(model, seqs, cfg, ref, totals=totals, passes=passes)
    finite = stats.pop("nonfinite_loss") == 0.0
    if dp is not None:  # --- data-parallel: sum the gradients; a non-finite loss on any rank skips everywhere
        finite = dp.reduce_gradients(params, finite=finite)
    grad_norm = _clip_gradients(params, grad_clip) if finite else math.nan
    kept, why, ratio = True, "", math.nan
    if math.isfinite(grad_norm):
        kept, why, ratio = _step_or_undo(optimizer, params, dp, snapshot_max_bytes, max_update_ratio)
    skipped = not math.isfinite(grad_norm) or not kept
    if not skipped and scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats.update(grad_norm=grad_norm, lr=lr, update_ratio=ratio, skipped_nonfinite=1.0 if skipped else 0.0,
                 nonfinite_params=1.0 if why == "nonfinite" else 0.0,
                 skipped_exploded=1.0 if why == "exploded" else 0.0, skipped_empty=0.0)
    return stats
