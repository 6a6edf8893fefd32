"""Batched generation with a local transformers causal LM: the engine rollouts use during training.

Semantics (chosen to match vLLM and verl, so that the two engines are interchangeable):

* **Log-probs** are ``log_softmax`` (in float32) of the model's *raw* logits, gathered at the sampled token:
  no temperature, no top-p. That is exactly what the trainer recomputes for the importance ratio, whatever
  sampling temperature produced the token.
* **EOS**: a row stops at the tokenizer's EOS id or any id in ``model.generation_config.eos_token_id``
  (e.g. ``<|im_end|>`` and ``<|endoftext|>``). The EOS token is part of what the policy sampled, so it is kept
  in ``token_ids`` and ``logprobs`` (the trainer must learn when to stop); ``text`` excludes it.
* **Stop strings** (vLLM default): generation stops at the token that completes a stop string; ``token_ids``
  and ``logprobs`` keep every sampled token up to and including that one, ``text`` is cut just before the
  stop string.
* ``finish_reason`` is ``'stop'`` for EOS or a stop string, ``'length'`` when ``max_tokens`` ran out.
* ``text`` is decoded with ``skip_special_tokens=True`` and no clean-up of spaces (as vLLM does).
* ``SamplingParams.seed`` seeds a per-sequence ``torch.Generator`` (sample ``j`` of a request gets its own
  stream derived from the seed), so a seeded request gives the same completions whatever else is batched
  with it (up to float rounding of the batched forward). As in vLLM, equal seeds mean equal noise: give
  different requests different seeds, or their samples are correlated.

Implementation: a custom decoding loop over the model's KV cache. Requests are sorted by prompt length and cut
into chunks of at most ``batch_size`` sequences; each chunk prefills its distinct prompts once (left
padding, ``position_ids = cumsum(attention_mask) - 1``), repeats the cache for ``n > 1`` samples, then
decodes one token per step for the still-active rows only (finished rows are dropped from the cache).
Prefill runs in groups of at most ``prefill_tokens`` padded tokens whose caches are then joined: on CPU a
big batched prefill is slower than several small ones (SmolLM2, 16 prompts of 500-900 tokens, 2 cores:
19.6 s in one forward, 12.5 s in pairs), while decoding gains from the big batch. Models whose cache is
not plain per-layer key/value tensors (sliding-window layers, ...) are prefilled in one forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.checks import validate_requests

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, sample index) over 64-bit seeds


@dataclass
class _Seq:
    """One sequence being generated: sample ``sample`` of request ``request``."""

    request: int
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Literal["eos", "stop", "length"] | None = None


def sequence_seed(seed: int, sample: int) -> int:
    """A distinct, reproducible generator seed for sample ``sample`` of a request seeded with ``seed``."""
    return (seed * _SEED_MIX + sample) % (2**63 - 1)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS id plus every id in the model's generation_config (chat models end turns there)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    return frozenset(ids)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                  generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens, log-probs of those tokens under the raw logits).

    Rows with temperature 0 take the argmax. Other rows sample from softmax(logits / T) restricted to the
    top-p nucleus, by the exponential race argmax(p / E), E ~ Exp(1) (one noise draw per row and step, from
    the row's own generator when it has one).
    """
    raw = logits.float()
    logp = torch.log_softmax(raw, dim=-1)
    tokens = raw.argmax(dim=-1)
    sampled_rows = (temperatures > 0).nonzero().flatten()
    if sampled_rows.numel():
        probs = torch.softmax(raw[sampled_rows] / temperatures[sampled_rows, None], dim=-1)
        top_p = top_ps[sampled_rows]
        if bool((top_p < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p[:, None]  # the first token always stays
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(outside, 0.0))
        noise = torch.empty_like(probs)
        unseeded = []
        for k, row in enumerate(sampled_rows.tolist()):
            gen = generators[row]
            if gen is None:
                unseeded.append(k)
            else:
                noise[k].exponential_(generator=gen)
        if unseeded:
            idx = torch.tensor(unseeded, device=noise.device)
            noise[idx] = torch.empty_like(noise[idx]).exponential_()
        tokens[sampled_rows] = (probs / noise).argmax(dim=-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


CPU_PREFILL_TOKENS = 2048


def prefill_groups(lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """Consecutive groups of prompt indices, each as large as fits ``budget`` padded tokens (rows x longest;
    a prompt longer than the budget is a group alone); one group when ``budget`` is None."""
    if budget is None:
        return [list(range(len(lengths)))] if lengths else []
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


def join_caches(caches: list[Any], widths: list[int]) -> Any | None:
    """One cache holding the rows of ``caches`` (in order), each left-padded with zeros to the widest; the
    first cache is reused. None when a layer is not a plain key/value ``DynamicLayer``."""
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for c in caches for layer in getattr(c, "layers", [None])):
        return None
    width = max(widths)
    joined = caches[0]
    for i, layer in enumerate(joined.layers):
        for name in ("keys", "values"):
            parts = [F.pad(getattr(c.layers[i], name), (0, 0, width - w, 0))
                     for c, w in zip(caches, widths, strict=True)]
            setattr(layer, name, torch.cat(parts, dim=0))
    return joined


class HFEngine:
    """The :class:`~memtrain.engines.base.Engine` over a local transformers causal LM (no copy of it).

    Generation runs under ``torch.no_grad`` with the model in eval mode; every module's train/eval flag is
    restored afterwards, so the trainer can hand over the very model it is updating.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64,
                 prefill_tokens: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"HFEngine batch_size={batch_size}; expected >= 1")
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"HFEngine prefill_tokens={prefill_tokens}; expected >= 1 or None")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # None: 2048 on CPU, one prefill per chunk elsewhere (GPUs want the big batch)
        self.prefill_tokens = prefill_tokens or (CPU_PREFILL_TOKENS if self.device.type == "cpu" else None)
        self._split_prefill = True  # cleared for a model whose cache cannot be joined

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return eos_token_ids(self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """``n`` completions per request; see the module docstring for the exact semantics."""
        validate_requests(requests)
        seqs = [_Seq(i, j, list(r.prompt_ids), r.params)
                for i, r in enumerate(requests) for j in range(r.params.n)]
        # Stable sort by prompt length: little padding per chunk, and a request's samples stay contiguous.
        order = sorted(seqs, key=lambda s: len(s.prompt_ids))
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    self._run_chunk(order[start:start + self.batch_size])
        finally:
            for module, training in modes:
                module.training = training
        results: list[list[Completion]] = [[] for _ in requests]
        for s in seqs:
            results[s.request].append(self._completion(s))
        return results

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else min(self.eos_token_ids, default=0)

    def _run_chunk(self, chunk: list[_Seq]) -> None:
        """Prefill the chunk's distinct prompts once, then decode all its sequences step by step."""
        active = [s for s in chunk if s.params.max_tokens > 0]
        for s in chunk:
            if s.params.max_tokens == 0:
                s.finish = "length"
        if not active:
            return
        device = self.device
        eos = self.eos_token_ids
        prompt_rows: dict[int, int] = {}
        prompts: list[list[int]] = []
        for s in active:
            if s.request not in prompt_rows:
                prompt_rows[s.request] = len(prompts)
                prompts.append(s.prompt_ids)
        logits, cache, mask = self._prefill(prompts)
        rows = torch.tensor([prompt_rows[s.request] for s in active], device=device)
        cache.batch_select_indices(rows)  # one cache row per sequence (n > 1 samples share a prefill)
        logits = logits[rows]
        mask = mask[rows]
        next_pos = torch.tensor([len(s.prompt_ids) for s in active], device=device)
        temps = torch.tensor([s.params.temperature for s in active], device=device, dtype=torch.float32)
        top_ps = torch.tensor([s.params.top_p for s in active], device=device, dtype=torch.float32)
        gens = [self._generator(s, device) for s in active]

        while True:
            tokens, logps = sample_tokens(logits, temps, top_ps, gens)
            keep: list[int] = []
            for k, (s, tok, lp) in enumerate(zip(active, tokens.tolist(), logps.tolist(), strict=True)):
                s.token_ids.append(tok)
                s.logprobs.append(lp)
                if tok in eos:
                    s.finish = "eos"
                elif s.params.stop and self._hits_stop(s):
                    s.finish = "stop"
                elif len(s.token_ids) >= s.params.max_tokens:
                    s.finish = "length"
                else:
                    keep.append(k)
            if not keep:
                return
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                active = [active[k] for k in keep]
                gens = [gens[k] for k in keep]
                tokens, mask, next_pos = tokens[idx], mask[idx], next_pos[idx]
                temps, top_ps = temps[idx], top_ps[idx]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` left-padded to the longest, and their attention mask."""
        width = max(len(p) for p in prompts)
        pad = self._pad_id()
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return input_ids, mask

    def _forward_prompts(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One left-padded forward over ``prompts``: the last position's logits, the KV cache, the mask."""
        input_ids, mask = self._left_padded(prompts)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values, mask

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """:meth:`_forward_prompts` over all ``prompts``, run in groups of ``prefill_tokens`` whose caches are
        joined (left-padded to the longest prompt, as the returned mask says)."""
        budget = self.prefill_tokens if self._split_prefill else None
        groups = prefill_groups([len(p) for p in prompts], budget)
        if len(groups) == 1:
            return self._forward_prompts(prompts)
        parts = [self._forward_prompts([prompts[i] for i in g]) for g in groups]
        cache = join_caches([c for _, c, _ in parts], [m.shape[1] for _, _, m in parts])
        if cache is None:
            self._split_prefill = False
            return self._forward_prompts(prompts)
        return torch.cat([logits for logits, _, _ in parts]), cache, self._left_padded(prompts)[1]

    @staticmethod
    def _generator(s: _Seq, device: torch.device) -> torch.Generator | None:
        if s.params.seed is None or s.params.greedy:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(sequence_seed(s.params.seed, s.sample))
        return gen

    def _decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _hits_stop(self, s: _Seq) -> bool:
        """Whether the newest token completed a stop string, decoding only a short tail of the completion.

        A stop string of c characters spans at most 4c byte-level tokens; the tail has two tokens more.
        """
        tail = 4 * max(len(stop) for stop in s.params.stop) + 2
        text = self._decode(s.token_ids[-tail:])
        return any(stop in text for stop in s.params.stop)

    def _completion(self, s: _Seq) -> Completion:
        ids = s.token_ids[:-1] if s.finish == "eos" else s.token_ids
        text = self._decode(ids)
        if s.finish == "stop":
            cuts = [pos for stop in s.params.stop if (pos := text.find(stop)) >= 0]
            if cuts:
                text = text[:min(cuts)]
        return Completion(token_ids=list(s.token_ids), text=text, logprobs=list(s.logprobs),
                          finish_reason="length" if s.finish == "length" else "stop")
