"""Log-probabilities of training sequences under the policy, computed the way the update needs them.

A training sequence is one model call: a prompt and the completion the sampler produced. Micro-batches are
planned by a token budget (``plan_update``): with ``rl.share_prompts``, tokens that every row of a
micro-batch has in common run once and the rest of each row runs on their KV cache - a whole prompt that
several sequences share (the G2 IMR answers to one memory, the first memory turns of a row's G1
trajectories), else the leading part of the prompt template (instructions and problem: 112 tokens of every
memory turn of the proxy task) - the same log-probs and gradients for (n - 1) x shared tokens fewer; what
shares nothing is right-padded together (``plan_micro_batches``). Log-probs are computed in float32 under
the SAMPLING distribution softmax(logits / rl.temperature) of the completion positions only
(``logits_to_keep``), the matmuls under autocast to the model's compute dtype (``model.compute_dtype``,
``memtrain.precision``): what the engines report (``Completion.logprobs``), so the importance ratio is
exactly 1 on the first update after sampling. ``memtrain.rl.update`` trains on them; the vLLM engine's sync
check compares with them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from memtrain.errors import UserError
from memtrain.precision import autocast_for
from memtrain.rl.rollout import HasTokens


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


# A shared prefix shorter than this is not worth a second forward call (a chat template's system prompt alone
# is ~25 tokens; prompt templates share ~100).
MIN_SHARED_PREFIX = 32


@dataclass(frozen=True)
class MicroBatch:
    """The sequence indices of one forward/backward pass; ``shared``: the number of leading tokens all of
    them have in common, run once, the rest of every row on their KV cache (0: right-padded rows)."""

    rows: list[int]
    shared: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_update(prompts: Sequence[Sequence[int]], completion_lengths: Sequence[int], max_tokens: int,
                share_prompts: bool = True) -> list[MicroBatch]:
    """The micro-batches of one update. With ``share_prompts``, first the sequences whose prompt another one
    repeats (cost: the prompt once + rows x the longest completion, kept <= ``max_tokens``, longest
    completions first); then the rest, grouped by prompts that share at least ``MIN_SHARED_PREFIX`` leading
    tokens (cost: that prefix once + rows x the longest remainder); what is left alone right-padded by
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
    for prompt, members in by_prompt.items():
        if len(members) == 1:
            rest.extend(members)
            continue
        for rows in _pack(members, len(prompt), lengths, max_tokens):
            if len(rows) > 1:
                shared.append(MicroBatch(rows, len(prompt)))
            else:
                rest.extend(rows)
    alone: list[int] = []
    for family in _prefix_families(prompts, rest):
        prefix = common_prefix(prompts[family[0]], prompts[family[-1]])
        for rows in _pack(family, prefix, lengths, max_tokens):
            if len(rows) > 1:
                first = prompts[rows[0]]
                shared.append(MicroBatch(rows, min(common_prefix(first, prompts[r]) for r in rows[1:])))
            else:
                alone.extend(rows)
    alone.sort()
    padded = plan_micro_batches([lengths[i] for i in alone], max_tokens) if alone else []
    return shared + [MicroBatch([alone[j] for j in rows]) for rows in padded]


def _pack(members: Sequence[int], prefix: int, lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Longest first, greedily: a micro-batch costs ``prefix`` once + rows x its longest remainder."""
    batches: list[list[int]] = []
    for i in sorted(members, key=lambda i: (-lengths[i], i)):
        if batches and prefix + (len(batches[-1]) + 1) * (lengths[batches[-1][0]] - prefix) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _prefix_families(prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> list[list[int]]:
    """``rows`` in runs whose prompts all share >= ``MIN_SHARED_PREFIX`` leading tokens with the run's first
    (in lexicographic order, so each run's common prefix is that of its first and last prompt)."""
    families: list[list[int]] = []
    for i in sorted(rows, key=lambda i: (list(prompts[i]), i)):
        if families and common_prefix(prompts[families[-1][0]], prompts[i]) >= MIN_SHARED_PREFIX:
            families[-1].append(i)
        else:
            families.append([i])
    return families


def device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@dataclass
class Batch:
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
    shared: int = 0  # every row starts with input_ids[0, :shared] (<= start + 1), run once

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


def collate(seqs: Sequence[HasTokens], rows: list[int], device: torch.device, shared: int = 0) -> Batch:
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
    if shared > start + 1 or not bool((input_ids[:, :shared] == input_ids[:1, :shared]).all()):
        raise ValueError(f"shared={shared}: the rows do not share their first {shared} tokens within the "
                         f"shortest prompt ({start + 1} tokens)")
    return Batch(rows, input_ids.to(device), attention.to(device), labels.to(device), mask.to(device), start,
                  offsets, shared)


def _logits(model: torch.nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """The [B, keep, vocab] logits of ``batch``: one right-padded forward, or (a shared prefix) the prefix
    once, its KV cache repeated per row, and every row's remainder on it; gradients flow through the cache
    into the prefix's forward, so they equal the padded forward's."""
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    with autocast_for(model):
        if not batch.shared:
            return model(input_ids=ids, attention_mask=attention, logits_to_keep=batch.keep,
                         use_cache=False).logits
        head = model(input_ids=ids[:1, :batch.shared], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise UserError(f"rl.share_prompts: {type(model).__name__} returned no repeatable KV cache "
                            "(transformers' Cache); set rl.share_prompts=false")
        cache.batch_repeat_interleave(ids.shape[0])
        tail_keep = min(batch.keep, ids.shape[1] - batch.shared)  # keep - 1: the prefix is a whole prompt
        tail = model(input_ids=ids[:, batch.shared:], attention_mask=attention, past_key_values=cache,
                     use_cache=True, logits_to_keep=tail_keep)
    if tail_keep == batch.keep:
        return tail.logits
    return torch.cat([head.logits.expand(ids.shape[0], -1, -1), tail.logits], dim=1)


def forward_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log p(label) [B, keep] under softmax(logits / temperature), in float32 (differentiable when
    grad is on), and optional entropies of that same tempered distribution (as verl reports them)."""
    device, _ = device_dtype(model)  # a reference model may live on another device than the batch
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
def training_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
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
    ``rl.share_prompts`` (tokens the rows of a micro-batch share run once).
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
    device, _ = device_dtype(model)
    out: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(seqs)
    plan = plan_update([s.prompt_ids for s in seqs], [len(s.completion_ids) for s in seqs],
                       micro_batch_tokens, share and can_share_prompts(model))
    with torch.no_grad(), training_mode(model, False):
        for micro in plan:
            batch = collate(seqs, micro.rows, device, micro.shared)
            logp, ent = forward_logprobs(model, batch, temperature, with_entropy)
            lps = batch.gather(logp)
            ents = batch.gather(ent) if ent is not None else [torch.empty(0)] * len(micro.rows)
            for b, i in enumerate(micro.rows):
                out[i] = (lps[b], ents[b])
    return out



def can_share_prompts(model: torch.nn.Module) -> bool:
    """A transformers model (peft-wrapped or not), so it returns the KV cache a shared prompt's completions
    run on, without gradient checkpointing (which drops that cache in training; the flag was renamed)."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    on = getattr(model, "is_activation_checkpointing", None)
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)
    return isinstance(base, PreTrainedModel) and not checkpointing


