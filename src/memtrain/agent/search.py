"""The search agent (MEM1 style, docs/method.md section 6): memory + one search per turn, then an answer.

Each turn is ONE fresh single-turn chat holding [instruction, problem, memory, latest search results]
(``search`` template; the last allowed turn uses ``search_last``, which forbids searching). The model
writes its new memory inside ``<memory>...</memory>`` and then either ``<search>query</search>`` or a final
``\\boxed{...}`` answer (several objectives: answers in order, separated by ';'). The memory REPLACES the
old one, as in the reading agent, so the prompt never grows with the number of turns.

Outcomes of an episode (counted in ``stats``):

* ``answer``: a box was given; scored with ``memtrain.scoring.score_multi`` against each objective's golds;
* ``malformed``: the reply had no usable action (no ``<search>`` and no closed box, an empty query, or a
  query cut by the token cap); the episode ends there with reward 0;
* ``no_answer``: the model still searched on its last allowed turn; reward 0.

Episodes run in waves, like ``MemoryAgent``: one engine call holds the next turn of every unfinished
episode, then one retriever call holds all queries of that wave. Identical prompts (the ``n`` episodes of a
sample at turn 0) share one request with ``n`` completions. Responses and results are capped at
``response_tokens`` / ``results_tokens`` tokens; generation stops at ``</search>`` so the model cannot
write its own "results".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from memtrain.agent.seeding import derive_seed
from memtrain.agent.types import Turn
from memtrain.config import Config
from memtrain.engines.base import Completion, Engine, GenerationRequest, SamplingParams
from memtrain.errors import UserError
from memtrain.prompts import render, template
from memtrain.retrieval.service import Hit, SearchBackend
from memtrain.scoring import METRICS, extract_boxed, score_multi

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
MEMORY_OPEN, MEMORY_CLOSE = "<memory>", "</memory>"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
STAT_KEYS = ("episodes", "turns", "waves", "searches", "answers", "malformed", "no_answer",
             "response_cap_hits", "results_truncated", "empty_results", "empty_memories")
Outcome = Literal["answer", "malformed", "no_answer"]


@dataclass(frozen=True)
class SearchAgentConfig:
    """Budgets of the search agent; the paper's MEM1 setting is 6 turns, 1k-token caps and top-3 results."""

    max_turns: int = 6
    response_tokens: int = 1024
    results_tokens: int = 1024
    top_k: int = 3
    templates: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> SearchAgentConfig:
        """Budgets from ``cfg.search``, templates from ``cfg.agent.templates`` (shared by train and eval)."""
        s = cfg.search
        return cls(max_turns=s.max_turns, response_tokens=s.response_tokens, results_tokens=s.results_tokens,
                   top_k=s.top_k, templates=dict(cfg.agent.templates))

    def __post_init__(self) -> None:
        for name in ("max_turns", "response_tokens", "results_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise UserError(f"search agent {name}={getattr(self, name)}: expected a positive integer")


@dataclass(frozen=True)
class Action:
    """What one reply asks for: its memory and a search, an answer, or nothing usable (with the reason)."""

    kind: Literal["search", "answer", "malformed"]
    memory: str
    query: str = ""
    answer: str = ""
    reason: str = ""


def parse_action(text: str, hit_cap: bool = False) -> Action:
    """Split a reply into memory and action; the action is whichever of ``<search>`` / ``\\boxed{`` comes
    first after the memory. A ``<search>`` left open is a query only when generation stopped on
    ``</search>`` (not when the token cap cut it)."""
    start = text.find(MEMORY_OPEN)
    end = text.find(MEMORY_CLOSE, start + len(MEMORY_OPEN)) if start >= 0 else -1
    if start >= 0 and end >= 0:
        memory, rest = text[start + len(MEMORY_OPEN) : end], text[end + len(MEMORY_CLOSE) :]
    else:
        memory, rest = "", text
    s = rest.find(SEARCH_OPEN)
    box = _BOX.search(rest)
    b = box.start() if box else -1
    if start < 0 or end < 0:  # no closed memory tag: the memory is what precedes the action
        cut = min(p for p in (s, b, len(rest)) if p >= 0)
        memory = rest[:cut].replace(MEMORY_OPEN, "")
    memory = memory.strip()
    if s >= 0 and (b < 0 or s < b):
        after = rest[s + len(SEARCH_OPEN) :]
        close = after.find(SEARCH_CLOSE)
        if close < 0 and hit_cap:
            return Action("malformed", memory, reason="search query cut by the response token cap")
        query = " ".join((after if close < 0 else after[:close]).split())
        if not query:
            return Action("malformed", memory, reason="empty search query")
        return Action("search", memory, query=query)
    if b >= 0:
        answer = extract_boxed(rest[b:])
        if answer is None:
            return Action("malformed", memory, reason="unclosed \\boxed{")
        return Action("answer", memory, answer=answer)
    return Action("malformed", memory, reason="no <search>...</search> and no \\boxed{} answer")


def objective_golds(sample: Mapping[str, Any], where: str) -> list[list[str]] | None:
    """Per-objective golds: ``objective_answers`` (multi-objective rows), else ``answers`` (one objective)."""
    golds = sample.get("objective_answers")
    if golds is None:
        answers = sample.get("answers")
        if answers is None:
            return None
        golds = [[answers] if isinstance(answers, str) else list(answers)]
    if isinstance(golds, str) or not golds or not all(
            isinstance(g, Sequence) and not isinstance(g, str) and g and all(isinstance(a, str) for a in g)
            for g in golds):
        raise UserError(f"{where}: 'objective_answers' must be a non-empty list of non-empty lists of "
                        f"strings, got {golds!r:.200}")
    return [list(g) for g in golds]


@dataclass
class SearchEpisode:
    sample_index: int
    sample_id: str
    turns: list[Turn]          # one 'search' turn per reply, in order (each is a training sequence)
    memories: list[str]        # memories[0] = initial text; memories[t + 1] = written at turn t
    queries: list[str]         # the searches issued, in order
    results: list[str]         # results[t] = the results text shown at turn t (results[0] = "no search yet")
    actions: list[str]         # per turn: search / answer / malformed
    outcome: Outcome
    answer: str                # the reply of the answering turn ('' unless outcome == 'answer')
    scores: dict[str, float]   # score_multi over objectives (0 on every metric unless answered); {} w/o golds
    reason: str = ""           # why the episode was malformed

    @property
    def reward(self) -> float:
        """Mean EM over objectives (the searchqa training reward); 0 for malformed / unanswered episodes."""
        return float(self.scores.get("em", 0.0)) if self.outcome == "answer" else 0.0

    def trace(self) -> list[dict[str, str]]:
        """Readable per-turn record (memory, action, query) for eval reports and training samples."""
        out = []
        for t, action in enumerate(self.actions):
            step = {"memory": self.memories[t + 1], "action": action, "results": self.results[t]}
            if action == "search":
                step["query"] = self.queries[sum(a == "search" for a in self.actions[:t])]
            out.append(step)
        return out


@dataclass
class _State:
    index: int
    sample_index: int
    memories: list[str]
    results: list[str]
    turns: list[Turn] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    outcome: Outcome | None = None
    answer: str = ""
    reason: str = ""
    pending_query: str | None = None


def format_results(query: str, hits: Sequence[Hit]) -> str:
    """The results block the model reads: the query, then numbered passages with their titles."""
    if not hits:
        return f"Search: {query}\nNo passage matched this search."
    docs = "\n".join(f"Doc {i} (Title: {h.title}) {h.text}" for i, h in enumerate(hits, start=1))
    return f"Search: {query}\n{docs}"


class SearchAgent:
    """Runs search episodes over a batch of samples with any engine and any retriever."""

    def __init__(self, engine: Engine, tokenizer: Any, retriever: SearchBackend,
                 config: SearchAgentConfig | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or SearchAgentConfig()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    @property
    def initial_memory(self) -> str:
        return template("search_initial_memory", self.config.templates)

    def prompt(self, problem: str, memory: str, results: str, last: bool) -> tuple[str, list[int]]:
        return render(self.tokenizer, "search_last" if last else "search", self.config.templates,
                      problem=problem, memory=memory, chunk=results)

    def cap_results(self, text: str) -> str:
        """At most ``results_tokens`` tokens of ``text`` (cut at a token boundary, counted when cut)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.results_tokens:
            return text
        self.stats["results_truncated"] += 1
        return self.tokenizer.decode(ids[: self.config.results_tokens], skip_special_tokens=True)

    def run(self, samples: list[dict], params: SamplingParams, n: int = 1) -> list[SearchEpisode]:
        """``n`` episodes per sample (sample-major). ``params.max_tokens``/``n``/``stop`` are set here."""
        if n < 1:
            raise ValueError(f"SearchAgent.run: n={n}; expected >= 1")
        for i, s in enumerate(samples):
            if not isinstance(s, Mapping) or not str(s.get("question") or "").strip():
                raise UserError(f"sample {i}: expected a dict with a non-empty 'question'")
            objective_golds(s, f"sample {i} (id {s.get('id')!r})")
        no_results = template("search_no_results", self.config.templates)
        states = [_State(i * n + j, i, [self.initial_memory], [no_results])
                  for i in range(len(samples)) for j in range(n)]
        self.stats["episodes"] += len(states)
        active = list(states)
        while active:
            self._wave(active, samples, params)
            active = [s for s in active if s.outcome is None]
        return [self._episode(s, samples[s.sample_index]) for s in states]

    def _wave(self, active: list[_State], samples: list[dict], params: SamplingParams) -> None:
        groups: dict[tuple[int, int, str, str], list[_State]] = {}
        for s in active:
            groups.setdefault((s.sample_index, len(s.turns), s.memories[-1], s.results[-1]), []).append(s)
        requests = []
        for (sample_index, step, memory, results), members in groups.items():
            last = step == self.config.max_turns - 1
            text, ids = self.prompt(samples[sample_index]["question"], memory, results, last)
            seed = (None if params.seed is None
                    else derive_seed(params.seed, sample_index, step, members[0].index))
            sp = replace(params, n=1 if params.greedy else len(members), seed=seed,
                         max_tokens=self.config.response_tokens, stop=(SEARCH_CLOSE,))
            requests.append(GenerationRequest(prompt_ids=ids, params=sp, prompt_text=text))
        outputs = self.engine.generate(requests)
        if len(outputs) != len(requests):
            raise RuntimeError(f"engine returned {len(outputs)} results for {len(requests)} requests")
        self.stats["waves"] += 1
        searching: list[_State] = []
        for request, members, completions in zip(requests, groups.values(), outputs, strict=True):
            if len(completions) != request.params.n:
                raise RuntimeError(f"engine returned {len(completions)} completions, "
                                   f"expected {request.params.n}")
            for j, s in enumerate(members):
                if self._advance(s, request, completions[0 if params.greedy else j]):
                    searching.append(s)
        if searching:  # one retriever call per wave, each distinct query once
            queries = list(dict.fromkeys(s.pending_query or "" for s in searching))
            hits = self.retriever.search(queries, self.config.top_k)
            if len(hits) != len(queries):
                raise RuntimeError(f"retriever returned {len(hits)} result lists for {len(queries)} queries")
            shown = {q: self.cap_results(format_results(q, row))
                     for q, row in zip(queries, hits, strict=True)}
            self.stats["empty_results"] += sum(not row for row in hits)
            for s in searching:
                s.results.append(shown[s.pending_query or ""])
                s.pending_query = None

    def _advance(self, s: _State, request: GenerationRequest, c: Completion) -> bool:
        """Record the turn and apply its action; True when the episode now waits for search results."""
        hit_cap = c.finish_reason == "length"
        step = len(s.turns)
        s.turns.append(Turn(kind="search", step=step, prompt_ids=list(request.prompt_ids),
                            completion_ids=list(c.token_ids), logprobs=list(c.logprobs), text=c.text,
                            hit_cap=hit_cap))
        self.stats["turns"] += 1
        self.stats["response_cap_hits"] += hit_cap
        action = parse_action(c.text, hit_cap)
        memory = action.memory
        if not memory:
            memory = self.initial_memory
            self.stats["empty_memories"] += 1
        s.memories.append(memory)
        s.actions.append(action.kind)
        if action.kind == "malformed":
            s.outcome, s.reason = "malformed", action.reason
            self.stats["malformed"] += 1
            return False
        if action.kind == "answer":
            s.outcome, s.answer = "answer", c.text
            self.stats["answers"] += 1
            return False
        s.queries.append(action.query)
        self.stats["searches"] += 1
        if step == self.config.max_turns - 1:
            s.outcome, s.reason = "no_answer", f"still searching after {self.config.max_turns} turns"
            self.stats["no_answer"] += 1
            return False
        s.pending_query = action.query
        return True

    def _episode(self, s: _State, sample: Mapping[str, Any]) -> SearchEpisode:
        golds = objective_golds(sample, f"sample {s.sample_index}")
        if golds is None:
            scores: dict[str, float] = {}
        elif s.outcome == "answer":
            scores = score_multi(s.answer, golds)
        else:
            scores = dict.fromkeys(METRICS, 0.0)
        return SearchEpisode(sample_index=s.sample_index, sample_id=str(sample.get("id", s.sample_index)),
                             turns=s.turns, memories=s.memories, queries=s.queries, results=s.results,
                             actions=s.actions, outcome=s.outcome or "no_answer", answer=s.answer,
                             scores=scores, reason=s.reason)
