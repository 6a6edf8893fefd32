"""Intermediate memory recall (IMR) prompts, the second proxy task (MEMTRAIN.md section 3).

For a finished trajectory over chunks c_0..c_{T-1} with memories m_0 (initial) .. m_T:

1. step k is drawn among the steps whose input memory m_k is not the initial text: k in 1..T (the final
   step's input memory m_T counts - it is a memory state like the others). A memory left empty by the
   model was replaced by the initial text (see :mod:`memtrain.agent.loop`), so such a step is not eligible.
2. chunk l is drawn with l < k, i.e. among the chunks m_k has already read (the paper's choice; the
   reference scripts' draw from 1..k with the input memory is an off-by-one that can ask about a chunk the
   memory has not seen yet).
3. an entity lying fully inside chunk l is drawn; every occurrence of it in the chunk is replaced by
   ``[TARGET]`` with the masking rule of the E2E task (:func:`memtrain.data.entities.mask_entity`: word
   boundaries, case-insensitive).
4. the prompt is the ``imr`` template with memory m_k and the masked chunk; the label is the entity.

The draws are hierarchical and uniform (k among steps that have at least one usable chunk before them, l
among usable chunks before k, the entity among the chunk's usable entities), from the caller's seeded
``random.Random``. When no (k, l, entity) exists the result is ``None``.

Entities come from the sample's ``entity_spans`` (character spans into ``context``, written by the proxy
data builder). When a sample has no ``entity_spans`` key (e.g. a QA sample), a fallback ``ner`` callable is
used: ``ner(text) -> list[(start, end, label)]`` with spans into the chunk text, e.g. a thin wrapper around
a spaCy pipeline; none is imported here, so the hot path stays free of spaCy. The proxy builder's candidate
filters apply (:func:`memtrain.data.entities.candidates`, with the chunk in the role of the pivot passage):
fewer than 8 words, fewer than 5 occurrences in the chunk, no square brackets, de-duplicated
case-insensitively.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from memtrain.agent.seeding import derive_seed
from memtrain.agent.types import Trajectory, Turn
from memtrain.config import AgentConfig
from memtrain.data.entities import candidates, count_matches, mask_entity, normalize_spans
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
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


def _chunk_entities(traj: Trajectory, sample: Mapping[str, Any], chunk_l: int,
                    ner: Ner | None) -> list[tuple[str, str]]:
    """(entity, label) pairs IMR may mask in chunk ``chunk_l``: inside the chunk, filtered, de-duplicated."""
    chunk = traj.chunks[chunk_l]
    spans = sample.get("entity_spans")
    where = f"sample {sample.get('id', traj.sample_id)!r}"
    if spans is None:
        if ner is None:
            raise ValueError(f"{where}: no 'entity_spans' and no fallback ner callable; IMR needs entities "
                             "(build proxy data with entity spans, or pass ner=...)")
        spans_found = normalize_spans(chunk, ner(chunk))
        found = candidates(chunk, spans_found, MAX_ENTITY_OCCURRENCES, MAX_ENTITY_WORDS)
        return [(c.text, c.label) for c in found]
    context = sample["context"]
    lo, hi = traj.chunk_char_spans[chunk_l]
    inside: list[tuple[int, int, str]] = []
    for i, span in enumerate(spans):
        try:
            s, e, label = int(span["start"]), int(span["end"]), str(span.get("label", ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{where}: entity_spans[{i}] = {span!r}; expected "
                             "{'start': int, 'end': int, 'label': str}") from None
        if not 0 <= s < e <= len(context):
            raise ValueError(f"{where}: entity_spans[{i}] = [{s}, {e}) lies outside the context "
                             f"({len(context)} characters)")
        if lo <= s and e <= hi:
            inside.append((s - lo, e - lo, label))
    found = candidates(context[lo:hi], inside, MAX_ENTITY_OCCURRENCES, MAX_ENTITY_WORDS)
    # The chunk is the decoded token slice: for byte-level tokenizers it equals context[lo:hi]; for others,
    # keep only entities that the chunk text really contains.
    return [(c.text, c.label) for c in found if chunk == context[lo:hi] or count_matches(chunk, c.text) > 0]


def build_imr_prompt(traj: Trajectory, sample: dict, tokenizer: Any, config: AgentConfig, rng: random.Random,
                     ner: Ner | None = None, trajectory_index: int = -1) -> ImrPrompt | None:
    """Draw (k, l, entity) for one finished trajectory and render its IMR prompt; None if none exists."""
    num_chunks = len(traj.chunks)
    if len(traj.memories) != num_chunks + 1:
        raise ValueError(f"trajectory of sample {traj.sample_id!r} is unfinished: "
                         f"{len(traj.memories)} memories for {num_chunks} chunks (expected {num_chunks + 1})")
    initial = template("initial_memory", config.templates)
    steps = [k for k in range(1, num_chunks + 1) if traj.memories[k] != initial]
    if not steps:
        return None
    entities = [_chunk_entities(traj, sample, j, ner) for j in range(max(steps))]
    steps = [k for k in steps if any(entities[:k])]
    if not steps:
        return None
    k = rng.choice(steps)
    chunk_l = rng.choice([j for j in range(k) if entities[j]])
    entity, label = rng.choice(entities[chunk_l])
    masked, _ = mask_entity(traj.chunks[chunk_l], entity, TARGET_TOKEN)
    text, ids = render(tokenizer, "imr", config.templates, problem=template("imr_question", config.templates),
                       memory=traj.memories[k], chunk=masked)
    return ImrPrompt(trajectory_index=trajectory_index, step_k=k, chunk_l=chunk_l, entity=entity,
                     label=entity, prompt_ids=ids, prompt_text=text, entity_label=label)


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
