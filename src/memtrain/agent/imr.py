"""Intermediate memory recall (IMR) prompts, the second proxy task (docs/method.md section 3).

For a finished trajectory over chunks c_0..c_{T-1} with memories m_0 (initial) .. m_T:

1. step k is drawn among the steps whose input memory m_k is not the initial text: k in 1..T (the final
   step's input memory m_T counts - it is a memory state like the others). A memory left empty by the
   model was replaced by the initial text (see :mod:`memtrain.agent.loop`), so such a step is not eligible.
2. chunk l is drawn with l < k, i.e. among the chunks m_k has already read (the paper's choice; the
   reference scripts' draw from 1..k with the input memory is an off-by-one that can ask about a chunk the
   memory has not seen yet).
3. an entity lying fully inside chunk l is drawn (never a number that is also a ``Document N:`` header of
   the document: masking it would turn the header into ``Document [TARGET]:``); every occurrence of it and
   of its variants in the chunk is replaced by ``[TARGET]`` with the masking rule of the E2E task
   (:mod:`memtrain.data.masking`: word boundaries, case rule, determiner stripped, surname / punctuation /
   contained-span variants masked too);
   an entity that a surviving variant would give away, or that needs more than ``DEFAULT_MAX_MASKS`` masks,
   is not eligible.
4. the prompt is the ``imr`` template with memory m_k and the masked chunk; the label is the entity.

The draws are hierarchical and uniform (k among steps that have at least one usable chunk before them, l
among usable chunks before k, the entity among the chunk's usable entities), from the caller's seeded
``random.Random``. When no (k, l, entity) exists the result is ``None``.

Entities come from the sample's ``entity_spans`` (character spans into ``context``, written by the proxy
data builder). When a sample has no ``entity_spans`` key (e.g. a QA sample), a fallback ``ner`` callable is
used: ``ner(text) -> list[(start, end, label)]`` with spans into the chunk text, e.g. a thin wrapper around
a spaCy pipeline; none is imported here, so the hot path stays free of spaCy. The proxy builder's candidate
filters apply (:func:`memtrain.data.entities.candidates`, with the chunk in the role of the pivot passage):
fewer than 8 words, fewer than 5 occurrences in the chunk, not an all-lower-case common word, no square
brackets, de-duplicated case-insensitively.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from memtrain.agent.seeding import derive_seed
from memtrain.agent.types import Trajectory, Turn
from memtrain.config import AgentConfig
from memtrain.data.entities import candidates
from memtrain.data.leaks import find_leaks
from memtrain.data.masking import (
    DEFAULT_MAX_MASKS,
    Span,
    header_count,
    mask_forms,
    names_a_header,
    normalize_spans,
    variant_forms,
)
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
from memtrain.errors import UserError
from memtrain.prompts import TARGET_TOKEN, render, template

Ner = Callable[[str], list[tuple[int, int, str]]]

MAX_ENTITY_WORDS = 8        # an entity must have fewer words than this
MAX_ENTITY_OCCURRENCES = 5  # ... and occur fewer times than this in its chunk


@dataclass
class ImrPrompt:
    trajectory_index: int     # position of the trajectory in the list it came from (-1 when not given)
    step_k: int               # the memory is memories[step_k], the input memory of step k
    chunk_l: int              # the masked chunk (l < k)
    entity: str               # the masked entity as it appears in the chunk
    label: str                # the gold answer: the entity text (score the IMR answer against it)
    prompt_ids: list[int]
    prompt_text: str
    entity_label: str = ""    # NER label of the entity (e.g. GPE, DATE)


def _mask_target(chunk: str, entity: str, variants: list[str]) -> str | None:
    """``chunk`` with ``entity`` and its variants masked as ``[TARGET]``; None when the rule cannot hide it
    (not in the chunk, a variant survives, or more than ``DEFAULT_MAX_MASKS`` replacements)."""
    masked = mask_forms(chunk, entity, TARGET_TOKEN, variants)
    if 0 < masked.count <= DEFAULT_MAX_MASKS and not find_leaks(masked.text, entity, variants):
        return masked.text
    return None


def _maskable(chunk: str, spans: list[Span], headers: int,
              masked_in: str | None = None) -> list[tuple[str, str, str]]:
    """(entity, label, masked chunk) for every candidate of ``chunk`` that the masking rule can hide and that
    is not a ``Document N:`` header number (N <= ``headers``); the masking is applied to ``masked_in``
    (default ``chunk``: the text the prompt will show)."""
    others = [chunk[s:e] for s, e, _ in spans]
    out = []
    for c in candidates(chunk, spans, MAX_ENTITY_OCCURRENCES, MAX_ENTITY_WORDS):
        if names_a_header(c.text, headers):
            continue
        variants = variant_forms(c.text, c.label, others)
        if (masked := _mask_target(chunk if masked_in is None else masked_in, c.text, variants)) is not None:
            out.append((c.text, c.label, masked))
    return out


def _chunk_entities(traj: Trajectory, sample: Mapping[str, Any], chunk_l: int,
                    ner: Ner | None) -> list[tuple[str, str, str]]:
    """(entity, label, masked chunk) for each entity IMR may mask in chunk ``chunk_l``: inside the chunk,
    filtered, de-duplicated, maskable without a leak."""
    chunk = traj.chunks[chunk_l]
    spans = sample.get("entity_spans")
    where = f"sample {sample.get('id', traj.sample_id)!r}"
    if spans is None:
        if ner is None:
            raise UserError(f"{where}: no 'entity_spans' and no fallback ner callable; IMR needs entities "
                            "(build proxy data with entity spans, or pass ner=...)")
        headers = header_count(sample.get("context", chunk))
        return _maskable(chunk, normalize_spans(chunk, ner(chunk)), headers)
    context = sample["context"]
    lo, hi = traj.chunk_char_spans[chunk_l]
    inside: list[Span] = []
    for i, span in enumerate(spans):
        try:
            s, e, label = int(span["start"]), int(span["end"]), str(span.get("label", ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{where}: entity_spans[{i}] = {span!r}; expected "
                            "{'start': int, 'end': int, 'label': str}") from None
        if not 0 <= s < e <= len(context):
            raise UserError(f"{where}: entity_spans[{i}] = [{s}, {e}) lies outside the context "
                            f"({len(context)} characters)")
        if lo <= s and e <= hi:
            inside.append((s - lo, e - lo, label))
    # The chunk is the decoded token slice: for byte-level tokenizers it equals context[lo:hi]; for others
    # the entities (found in the context) are masked, variants and checks included, in the chunk itself.
    return _maskable(context[lo:hi], inside, header_count(context), masked_in=chunk)


ChunkCache = dict[tuple[int, int, tuple[int, int]], list[tuple[str, str, str]]]


def _cached_entities(traj: Trajectory, sample: Mapping[str, Any], chunk_l: int, ner: Ner | None,
                     cache: ChunkCache | None) -> list[tuple[str, str, str]]:
    """:func:`_chunk_entities`, computed once per chunk of a sample: the G1 trajectories of a sample read the
    same chunks, so without ``cache`` their IMR draws would mask every chunk G1 times over."""
    if cache is None:
        return _chunk_entities(traj, sample, chunk_l, ner)
    key = (traj.sample_index, chunk_l, traj.chunk_char_spans[chunk_l])
    if key not in cache:
        cache[key] = _chunk_entities(traj, sample, chunk_l, ner)
    return cache[key]


def build_imr_prompt(traj: Trajectory, sample: dict, tokenizer: Any, config: AgentConfig, rng: random.Random,
                     ner: Ner | None = None, trajectory_index: int = -1,
                     cache: ChunkCache | None = None) -> ImrPrompt | None:
    """Draw (k, l, entity) for one finished trajectory and render its IMR prompt; None if none exists.

    ``cache``: share one dict over the trajectories of one batch of samples (see :func:`_cached_entities`).
    """
    num_chunks = len(traj.chunks)
    if len(traj.memories) != num_chunks + 1:
        raise ValueError(f"trajectory of sample {traj.sample_id!r} is unfinished: "
                         f"{len(traj.memories)} memories for {num_chunks} chunks (expected {num_chunks + 1})")
    initial = template("initial_memory", config.templates)
    steps = [k for k in range(1, num_chunks + 1) if traj.memories[k] != initial]
    if not steps:
        return None
    entities = [_cached_entities(traj, sample, j, ner, cache) for j in range(max(steps))]
    steps = [k for k in steps if any(entities[:k])]
    if not steps:
        return None
    k = rng.choice(steps)
    chunk_l = rng.choice([j for j in range(k) if entities[j]])
    entity, label, masked = rng.choice(entities[chunk_l])
    text, ids = render(tokenizer, "imr", config.templates, problem=template("imr_question", config.templates),
                       memory=traj.memories[k], chunk=masked)
    return ImrPrompt(trajectory_index=trajectory_index, step_k=k, chunk_l=chunk_l, entity=entity,
                     label=entity, prompt_ids=ids, prompt_text=text, entity_label=label)


@dataclass
class ImrChoice:
    """A data-only IMR question: which memory state, which chunk, which entity (no prompt, no memory)."""

    step_k: int               # the memory to ask is memories[step_k] (1..T)
    chunk_l: int              # the masked chunk (l < k)
    entity: str               # the masked entity as it appears in the chunk (also the label)
    entity_label: str         # NER label of the entity
    masked_chunk: str         # chunk l with the entity replaced by ``[TARGET]``


def draw_imr_choice(traj: Trajectory, sample: Mapping[str, Any], rng: random.Random,
                    ner: Ner | None = None) -> ImrChoice | None:
    """Draw (k, l, entity) from the data alone - the chunks and their entities, never the memories.

    For evaluation: two models reading the same chunks get the same question for the same ``rng`` state,
    whatever their memories hold. Same hierarchical uniform draw as :func:`build_imr_prompt`, except that a
    step whose memory is the initial text stays eligible (the caller decides how to score it); None when no
    chunk has a usable entity.
    """
    num_chunks = len(traj.chunks)
    entities = [_chunk_entities(traj, sample, j, ner) for j in range(num_chunks)]
    steps = [k for k in range(1, num_chunks + 1) if any(entities[:k])]
    if not steps:
        return None
    k = rng.choice(steps)
    chunk_l = rng.choice([j for j in range(k) if entities[j]])
    entity, label, masked = rng.choice(entities[chunk_l])
    return ImrChoice(step_k=k, chunk_l=chunk_l, entity=entity, entity_label=label, masked_chunk=masked)


def run_imr(engine: Engine, prompts: list[ImrPrompt], params: SamplingParams, group_size: int,
            max_tokens: int) -> list[list[Turn]]:
    """``group_size`` sampled answers per IMR prompt in one engine call, as ``kind="imr"`` turns (step k)."""
    if group_size < 1:
        raise ValueError(f"run_imr: group_size={group_size}; expected >= 1")
    requests = []
    for i, p in enumerate(prompts):
        seed = None if params.seed is None else derive_seed(params.seed, -1, i, p.step_k, p.chunk_l)
        sp = replace(params, n=group_size, max_tokens=max_tokens, seed=seed)
        requests.append(GenerationRequest(prompt_ids=list(p.prompt_ids), params=sp,
                                          prompt_text=p.prompt_text))
    outputs = engine.generate(requests) if requests else []
    if len(outputs) != len(requests):
        raise RuntimeError(f"engine returned {len(outputs)} results for {len(requests)} IMR requests")
    turns = []
    for p, request, completions in zip(prompts, requests, outputs, strict=True):
        if len(completions) != group_size:
            raise RuntimeError(f"engine returned {len(completions)} IMR completions, expected {group_size}")
        turns.append([Turn(kind="imr", step=p.step_k, prompt_ids=list(request.prompt_ids),
                           completion_ids=list(c.token_ids), logprobs=list(c.logprobs), text=c.text,
                           hit_cap=c.finish_reason == "length") for c in completions])
    return turns
