"""Batched generation with a local transformers causal LM: the engine rollouts use during training.

Semantics (chosen to match vLLM and verl, so that the two engines are interchangeable):

* **Log-probs** (float32) are those of the sampled token under the distribution it was drawn from:
  ``log_softmax(logits / T)``, and with ``top_p < 1`` the nucleus renormalised (vLLM's
  ``--logprobs-mode processed_logprobs``). The trainer recomputes ``log_softmax(logits / rl.temperature)``
  (as verl and TRL divide by the rollout temperature) and refuses ``rl.top_p < 1``, so the two agree at
  any training temperature. Greedy rows (T = 0) report ``log_softmax`` of the raw logits.
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

Precision: generation runs under the model's compute dtype (``model.compute_dtype``,
``memtrain.precision.autocast_for``), the same autocast the trainer's forward uses, from the same float32
weights: no second model. Autocast casts each trainable weight to bf16 once per ``generate`` call and caches
it for the call (a transient half-size copy, freed afterwards; decoding reads it instead of the fp32 weights).
The KV cache is stored in the compute dtype (:class:`CastCacheLayer`): attention runs in bf16 under autocast
anyway, so this halves the cache without changing a single number.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from memtrain.config import EngineConfig
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.checks import validate_requests
from memtrain.engines.registry import register_engine
from memtrain.models import load_policy, load_tokenizer
from memtrain.precision import autocast_dtype, autocast_for

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


def sampling_logprobs(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] float32 log-probs of the distribution each row samples from (-inf outside the nucleus).

    log_softmax(logits / T); where top_p < 1, only the smallest set of most likely tokens whose mass reaches
    top_p is kept (the first token always), renormalised. Rows with T = 0 (greedy) get log_softmax(logits).
    """
    raw = logits.float()
    temps = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures)).to(raw.dtype)
    logp = torch.log_softmax(raw / temps[:, None], dim=-1)
    nucleus = (temperatures > 0) & (top_ps < 1.0)
    if bool(nucleus.any()):
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_lp.exp()
        outside = (sorted_p.cumsum(dim=-1) - sorted_p) > top_ps[:, None]  # mass BEFORE the token > top_p
        outside &= nucleus[:, None]
        sorted_lp = sorted_lp.masked_fill(outside, -torch.inf)
        kept = torch.full_like(logp, -torch.inf).scatter_(1, order, sorted_lp)
        logp = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
    return logp


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                  generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens, their log-probs under the sampling distribution).

    Rows with temperature 0 take the argmax (log-prob under the raw logits). Other rows sample from
    ``sampling_logprobs`` (softmax(logits / T) restricted to the top-p nucleus) by the exponential race
    argmax(p / E), E ~ Exp(1) (one noise draw per row and step, from the row's own generator when it has one).
    """
    logp = sampling_logprobs(logits, temperatures, top_ps)
    tokens = logits.argmax(dim=-1)
    sampled_rows = (temperatures > 0).nonzero().flatten()
    if sampled_rows.numel():
        probs = logp[sampled_rows].exp()
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


@functools.cache
def _cast_layer_class() -> type:
    """:class:`CastCacheLayer`, built on first use (keeps transformers out of this module's import)."""
    from transformers.cache_utils import DynamicLayer

    class CastCacheLayer(DynamicLayer):
        """A ``DynamicLayer`` that stores keys/values in ``dtype`` (the autocast compute dtype).

        Under bf16 autocast the k/v projections come out bf16 but RoPE (cos/sin in the fp32 residual's dtype)
        promotes them back to fp32; attention casts them to bf16 again, so storing them in bf16 is exact.
        """

        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.dtype = dtype

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return super().update(key_states.to(self.dtype), value_states.to(self.dtype), *args, **kwargs)

    return CastCacheLayer


def new_cache(model: Any, dtype: torch.dtype | None) -> Any | None:
    """An empty ``DynamicCache`` for ``model`` whose plain key/value layers store ``dtype``; None for
    ``dtype`` None (let the model build its own) or a model whose config cannot describe its cache."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if dtype is None or getattr(model, "config", None) is None:
        return None
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot map to layer types: use the model's default cache
        return None
    layer_cls = _cast_layer_class()
    cache.layers = [layer_cls(dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def join_caches(caches: list[Any], widths: list[int]) -> Any | None:
    """One cache holding the rows of ``caches`` (in order), each left-padded with zeros to the widest; the
    first cache is reused. None when a layer is not a plain key/value ``DynamicLayer`` (or ours)."""
    from transformers.cache_utils import DynamicLayer

    plain = (DynamicLayer, _cast_layer_class())
    if not all(type(layer) in plain for c in caches for layer in getattr(c, "layers", [None])):
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

    def sync_weights(self, model: Any) -> dict[str, float]:
        """Nothing to copy: this engine samples from the trainer's own model object."""
        if model is not self.model:
            raise ValueError("HFEngine.sync_weights: the engine wraps another model object than the one "
                             "being trained; build it with make_engine(..., model=<the policy>)")
        return {}

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
            # one autocast region for the whole call: each weight is cast to the compute dtype once
            with torch.no_grad(), autocast_for(self.model):
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
        kwargs: dict[str, Any] = {}
        cache = new_cache(self.model, autocast_dtype(self.model))
        if cache is not None:
            kwargs["past_key_values"] = cache
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **kwargs)
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


@register_engine("hf")
def build_hf_engine(cfg: EngineConfig, model_name: str, model: Any, tokenizer: Any) -> HFEngine:
    """Wraps ``model`` (the trainer passes the very model it updates) or loads ``model_name``."""

    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    if model is None:
        model = load_policy(model_name)
    return HFEngine(model, tokenizer, batch_size=cfg.batch_size, prefill_tokens=cfg.prefill_tokens)
