"""The memory agent loop shared by RL rollouts, evaluation and ``memtrain answer`` (docs/method.md section 1).

Many documents x many samples run at once, in *waves*: each wave sends the next turn of every unfinished
trajectory to the engine in one ``generate`` call. A trajectory whose chunks are all read gets its final
(answer) turn in the very next wave, whatever the other trajectories are doing, so short documents never
wait for the longest one, and a batch holds memory and final turns side by side.

Within a wave, trajectories whose next prompt is identical (the same sample, step and memory - e.g. the
``n`` samples of a document at step 0) share one request with ``n`` completions, so the engine prefills
that prompt once. Under greedy decoding identical prompts give identical outputs, so one completion is
requested and copied. With ``params.seed`` set, each request gets its own seed derived from
``(seed, sample, step, first trajectory)``, so a seeded run is reproducible and its trajectories differ.

Memory between steps is the *text* of the memory completion (``Completion.text``: the EOS is not in it;
a completion cut by ``memory_tokens`` is used as generated), with surrounding whitespace stripped. An empty
memory output is replaced by the initial "no previous memory" text - the model kept nothing, and that text
says so - and counted in ``stats['empty_memories']``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from memtrain.agent.chunking import ChunkedDocument, chunk_document
from memtrain.agent.imr import ChunkCache, ImrPrompt, Ner, build_imr_prompt
from memtrain.agent.seeding import derive_seed
from memtrain.agent.types import Trajectory, Turn
from memtrain.budgets import check_context_budget
from memtrain.config import AgentConfig
from memtrain.engines.base import Completion, Engine, GenerationRequest, SamplingParams
from memtrain.errors import UserError
from memtrain.models import engine_context_length
from memtrain.prompts import render, template
from memtrain.scoring import score

STAT_KEYS = ("documents", "trajectories", "truncated_docs", "waves", "memory_turns", "memory_cap_hits",
             "empty_memories", "final_turns", "answer_cap_hits", "imr_prompts", "imr_none")

TurnCallback = Callable[[int, Turn, int], None]  # (trajectory index, finished turn, number of chunks)


def _answers(sample: Mapping[str, Any], where: str) -> list[str]:
    """Gold answers as a list; none (absent or empty) is allowed - inference has no golds - and scores {}."""
    golds = sample.get("answers")
    if golds is None:
        return []
    if isinstance(golds, str):
        return [golds]
    if isinstance(golds, Mapping) or not isinstance(golds, Iterable):
        raise UserError(f"{where}: 'answers' must be a list of strings, got {golds!r}")
    golds = list(golds)  # also numpy / arrow arrays read from parquet
    if not all(isinstance(g, str) for g in golds):
        raise UserError(f"{where}: 'answers' must be a list of strings, got {golds!r}")
    return golds


def check_sample(sample: Any, index: int) -> None:
    """Fail before any generation on a sample the loop cannot run, naming it and the field."""
    where = f"sample {index}"
    if not isinstance(sample, Mapping):
        raise UserError(f"{where}: expected a dict with 'id', 'context', 'question', 'answers', "
                        f"got {type(sample).__name__}")
    where = f"sample {index} (id {sample.get('id')!r})"
    for key in ("context", "question"):
        value = sample.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: {key!r} must be a non-empty string, got {value!r:.80}")
    _answers(sample, where)


@dataclass
class _State:
    """One trajectory in flight."""

    index: int
    sample_index: int
    doc: ChunkedDocument
    memories: list[str]
    turns: list[Turn] = field(default_factory=list)
    empty_memories: list[int] = field(default_factory=list)
    answer: str | None = None

    @property
    def step(self) -> int:
        return len(self.turns)

    @property
    def final_next(self) -> bool:
        return self.step == len(self.doc.chunks)


class MemoryAgent:
    """Runs the chunked-reading memory agent over a batch of samples with any :class:`Engine`."""

    def __init__(self, engine: Engine, tokenizer: Any, config: AgentConfig,
                 context_length: int | None = None) -> None:
        """``context_length``: the model's positions (default: read from an in-process engine's model; a
        server engine enforces its own). Budgets that do not fit fail here, before any generation."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._instruction_lengths: dict[str, int] = {}
        self.context_length = context_length if context_length is not None else engine_context_length(engine)
        if self.context_length is not None:
            check_context_budget(config, self.context_length)

    @property
    def initial_memory(self) -> str:
        return template("initial_memory", self.config.templates)

    def chunk(self, sample: Mapping[str, Any], index: int = 0) -> ChunkedDocument:
        """The chunks the agent reads for ``sample`` under this agent's budgets."""
        c = self.config
        return chunk_document(sample["context"], self.tokenizer, c.chunk_tokens, c.max_chunks, c.truncation,
                              doc_id=str(sample.get("id", index)))

    def memory_prompt(self, problem: str, memory: str, chunk: str) -> tuple[str, list[int]]:
        return render(self.tokenizer, "memory", self.config.templates, problem=problem, memory=memory,
                      chunk=chunk)

    def final_prompt(self, problem: str, memory: str) -> tuple[str, list[int]]:
        return render(self.tokenizer, "final", self.config.templates, problem=problem, memory=memory)

    def _instruction_length(self, problem: str) -> int:
        """Tokens of the memory prompt without memory and chunk (cached: a proxy set asks one question)."""
        if problem not in self._instruction_lengths:
            self._instruction_lengths[problem] = len(self.memory_prompt(problem, "", "")[1])
        return self._instruction_lengths[problem]

    def check_problem_budget(self, sample: Mapping[str, Any], index: int) -> None:
        """Fail, naming the sample, when instruction + problem (the memory prompt without memory and chunk)
        exceed ``agent.instruction_tokens``: the prompt would silently overflow the context the chunk and
        memory budgets were sized for (docs/method.md section 1)."""
        n = self._instruction_length(sample["question"])
        if n > self.config.instruction_tokens:
            raise UserError(
                f"sample {index} (id {sample.get('id')!r}): instruction + problem take {n} tokens, over "
                f"agent.instruction_tokens={self.config.instruction_tokens}; shorten the question or raise "
                "the budget (and the model context with it)")

    def cap_rates(self) -> dict[str, float]:
        """Fraction of memory / final turns stopped by their token cap (the budget hit-rate to report)."""
        s = self.stats
        return {"memory_cap_rate": s["memory_cap_hits"] / max(s["memory_turns"], 1),
                "answer_cap_rate": s["answer_cap_hits"] / max(s["final_turns"], 1)}

    def run(self, samples: list[dict], params: SamplingParams, n: int = 1, *,
            on_turn: TurnCallback | None = None) -> list[Trajectory]:
        """samples: dicts with 'id', 'context', 'question', 'answers' (list[str]); n trajectories per
        sample, returned sample-major: [s0t0, s0t1, ..., s1t0, ...]. params.n is ignored (n given here);
        params.max_tokens is ignored too: memory turns use config.memory_tokens, final turns answer_tokens.

        ``on_turn(trajectory_index, turn, num_chunks)`` is called after every turn (progress display).
        """
        if n < 1:
            raise ValueError(f"MemoryAgent.run: n={n}; expected >= 1")
        for i, s in enumerate(samples):
            check_sample(s, i)
            self.check_problem_budget(s, i)
        docs = [self.chunk(s, i) for i, s in enumerate(samples)]
        self.stats["documents"] += len(samples)
        self.stats["truncated_docs"] += sum(d.truncated for d in docs)
        self.stats["trajectories"] += len(samples) * n
        states = [_State(index=i * n + j, sample_index=i, doc=docs[i], memories=[self.initial_memory])
                  for i in range(len(samples)) for j in range(n)]
        active = list(states)
        while active:
            self._wave(active, samples, params, on_turn)
            active = [s for s in active if s.answer is None]
        return [self._trajectory(s, samples[s.sample_index]) for s in states]

    def _wave(self, active: list[_State], samples: list[dict], params: SamplingParams,
              on_turn: TurnCallback | None) -> None:
        """One engine call holding the next turn of every active trajectory."""
        groups: dict[tuple[int, int, str], list[_State]] = {}
        for s in active:
            groups.setdefault((s.sample_index, s.step, s.memories[-1]), []).append(s)
        requests = []
        for (sample_index, step, memory), members in groups.items():
            problem = samples[sample_index]["question"]
            final = members[0].final_next
            if final:
                text, ids = self.final_prompt(problem, memory)
            else:
                text, ids = self.memory_prompt(problem, memory, members[0].doc.chunks[step])
            seed = (None if params.seed is None
                    else derive_seed(params.seed, sample_index, step, members[0].index))
            sp = replace(params, n=1 if params.greedy else len(members), seed=seed,
                         max_tokens=self.config.answer_tokens if final else self.config.memory_tokens)
            requests.append(GenerationRequest(prompt_ids=ids, params=sp, prompt_text=text))
        outputs = self.engine.generate(requests)
        if len(outputs) != len(requests):
            raise RuntimeError(f"engine returned {len(outputs)} results for {len(requests)} requests")
        self.stats["waves"] += 1
        for request, members, completions in zip(requests, groups.values(), outputs, strict=True):
            if len(completions) != request.params.n:
                raise RuntimeError(f"engine returned {len(completions)} completions, "
                                   f"expected {request.params.n}")
            for j, s in enumerate(members):
                turn = self._advance(s, request, completions[0 if params.greedy else j])
                if on_turn is not None:
                    on_turn(s.index, turn, len(s.doc.chunks))

    def _advance(self, s: _State, request: GenerationRequest, c: Completion) -> Turn:
        """Record the turn and move the trajectory on (new memory, or its answer)."""
        final = s.final_next
        turn = Turn(kind="final" if final else "memory", step=s.step, prompt_ids=list(request.prompt_ids),
                    completion_ids=list(c.token_ids), logprobs=list(c.logprobs), text=c.text,
                    hit_cap=c.finish_reason == "length")
        s.turns.append(turn)
        if final:
            s.answer = c.text
            self.stats["final_turns"] += 1
            self.stats["answer_cap_hits"] += turn.hit_cap
        else:
            memory = c.text.strip()
            self.stats["memory_turns"] += 1
            self.stats["memory_cap_hits"] += turn.hit_cap
            if not memory:
                memory = self.initial_memory
                s.empty_memories.append(turn.step)
                self.stats["empty_memories"] += 1
            s.memories.append(memory)
        return turn

    def _trajectory(self, s: _State, sample: Mapping[str, Any]) -> Trajectory:
        answer = s.answer or ""
        golds = _answers(sample, f"sample {s.sample_index}")
        return Trajectory(sample_index=s.sample_index, sample_id=str(sample.get("id", s.sample_index)),
                          chunks=list(s.doc.chunks), chunk_char_spans=list(s.doc.char_spans),
                          memories=s.memories, turns=s.turns, answer=answer,
                          scores=score(answer, golds) if golds else {}, truncated=s.doc.truncated,
                          num_doc_tokens=s.doc.num_tokens, empty_memories=s.empty_memories, golds=golds)

    def check_imr_budget(self) -> None:
        """The IMR turn (memory + chunk + answer) must fit the model's context too (see memtrain.budgets)."""
        if self.context_length is not None:
            check_context_budget(self.config, self.context_length, imr=True)

    def imr_prompts(self, trajectories: list[Trajectory], samples: list[dict], rng: random.Random,
                    ner: Ner | None = None) -> list[ImrPrompt | None]:
        """One IMR prompt per trajectory (``None`` where no valid choice exists, counted in ``imr_none``).

        ``samples`` is the list given to :meth:`run`; the result is aligned with ``trajectories``.
        """
        self.check_imr_budget()
        out: list[ImrPrompt | None] = []
        cache: ChunkCache = {}  # the trajectories of a sample share its chunks and their maskable entities
        for i, traj in enumerate(trajectories):
            p = build_imr_prompt(traj, samples[traj.sample_index], self.tokenizer, self.config, rng, ner=ner,
                                 trajectory_index=i, cache=cache)
            self.stats["imr_prompts" if p is not None else "imr_none"] += 1
            out.append(p)
        return out
