"""The search agent loop (scripted engine + real BM25 retriever), its action parser and the searchqa task."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from memtrain.agent.search import (
    SearchAgent,
    SearchAgentConfig,
    format_results,
    objective_golds,
    parse_action,
)
from memtrain.config import load_config
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.prompts import parse, render
from memtrain.retrieval.service import Hit, Retriever
from memtrain.scoring import METRICS

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from memtrain.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    d = tmp_path_factory.mktemp("search")
    passages = [("Eiffel Tower", "The Eiffel Tower in Paris was completed in 1889."),
                ("Berlin", "Berlin is the capital of Germany."),
                ("Rome", "Rome is the capital of Italy."),
                ("Danube", "The Danube flows through Vienna and Budapest.")]
    corpus = d / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'})
                                for i, (t, x) in enumerate(passages)) + "\n")
    return Retriever.build(corpus, d / "idx")


class CountingRetriever:
    """Wraps the real retriever to record the queries of each call (what a wave sends)."""

    def __init__(self, inner: Retriever) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        self.calls.append(list(queries))
        return self.inner.search(queries, k)


def test_parse_action_cases() -> None:
    a = parse_action("<memory>Paris facts</memory>\n<search>Eiffel Tower year</search>")
    assert (a.kind, a.memory, a.query) == ("search", "Paris facts", "Eiffel Tower year")
    a = parse_action("<memory>m</memory><search>open query cut by the stop string")
    assert a.kind == "search" and a.query == "open query cut by the stop string"
    assert parse_action("<memory>m</memory><search>cut by the cap", hit_cap=True).kind == "malformed"
    a = parse_action("<memory>known</memory> The answer is \\boxed{1889; Berlin}")
    assert (a.kind, a.answer) == ("answer", "1889; Berlin")
    a = parse_action("notes without tags \\boxed{x} <search>late</search>")  # first action wins
    assert (a.kind, a.memory, a.answer) == ("answer", "notes without tags", "x")
    assert parse_action("<memory>m</memory><search>  </search>").reason == "empty search query"
    assert parse_action("<memory>m</memory> \\boxed{unclosed").reason == "unclosed \\boxed{"
    assert parse_action("just chatting").kind == "malformed"
    assert format_results("q", []) == "Search: q\nNo passage matched this search."
    assert format_results("q", [Hit("1", "T", "text", 1.0)]) == "Search: q\nDoc 1 (Title: T) text"


def test_objective_golds() -> None:
    assert objective_golds({"objective_answers": [["a"], ["b", "c"]]}, "s") == [["a"], ["b", "c"]]
    assert objective_golds({"answers": ["a", "b"]}, "s") == [["a", "b"]]
    assert objective_golds({}, "s") is None
    with pytest.raises(ValueError, match="objective_answers"):
        objective_golds({"objective_answers": [[]]}, "s")


def _responder(prompt: str, sample: int) -> str:
    """Search once for the capital, then answer; a malformed reply for the question about rivers."""
    problem = (parse("search", prompt) or parse("search_last", prompt))["problem"]
    if "river" in problem:
        return "I am not sure what to do."
    if "loop forever" in problem:
        return "<memory>still looking</memory><search>capital of Italy</search>"
    if "Doc 1 (Title: Berlin)" in prompt:
        return "<memory>Berlin is the capital of Germany</memory> \\boxed{Berlin; 1889}"
    return "<memory>need the capital</memory><search>capital of Germany</search> and hallucinated results"


SAMPLES = [
    {"id": "two", "question": "Question 1: capital of Germany?\nQuestion 2: Eiffel Tower year?",
     "objective_answers": [["Berlin"], ["1889"]]},
    {"id": "river", "question": "Which river flows through Vienna?", "objective_answers": [["Danube"]]},
    {"id": "loop", "question": "loop forever please", "objective_answers": [["Rome"]]},
]


def test_episodes_search_answer_malformed_and_run_out(tok: Any, retriever: Retriever) -> None:
    counting = CountingRetriever(retriever)
    engine = ScriptedEngine(_responder, tok)
    agent = SearchAgent(engine, tok, counting, SearchAgentConfig(max_turns=3))
    eps = agent.run(SAMPLES, GREEDY, n=2)
    assert [e.sample_id for e in eps] == ["two", "two", "river", "river", "loop", "loop"]
    two, river, loop = eps[0], eps[2], eps[4]
    assert two.outcome == "answer" and two.queries == ["capital of Germany"]
    assert two.actions == ["search", "answer"]
    assert two.scores["em"] == 1.0 and two.reward == 1.0
    assert two.memories == [agent.initial_memory, "need the capital", "Berlin is the capital of Germany"]
    assert "Doc 1 (Title: Berlin)" in two.results[1] and "hallucinated" not in two.results[1]
    assert [t.kind for t in two.turns] == ["search", "search"] and [t.step for t in two.turns] == [0, 1]
    assert river.outcome == "malformed" and river.reward == 0.0 and len(river.turns) == 1
    assert river.scores == dict.fromkeys(METRICS, 0.0)
    assert loop.outcome == "no_answer" and len(loop.turns) == 3 and loop.reward == 0.0
    # the last turn uses the no-more-searching prompt
    assert "This is your last turn" in tok.decode(loop.turns[2].prompt_ids)
    assert "This is your last turn" not in tok.decode(loop.turns[1].prompt_ids)
    # waves: one engine call per turn depth; identical greedy prompts share one request
    assert len(engine.calls) == 3 and [len(c) for c in engine.calls] == [3, 2, 1]
    assert counting.calls == [["capital of Germany", "capital of Italy"], ["capital of Italy"]]
    s = agent.stats
    assert (s["episodes"], s["answers"], s["malformed"], s["no_answer"], s["searches"]) == (6, 2, 2, 2, 8)
    trace = two.trace()
    assert trace[0]["query"] == "capital of Germany" and trace[1]["action"] == "answer"


def test_turns_hold_exact_prompt_tokens_and_stop_on_search_close(tok: Any, retriever: Retriever) -> None:
    engine = ScriptedEngine(_responder, tok, logprob=-0.25)
    agent = SearchAgent(engine, tok, retriever, SearchAgentConfig(max_turns=2))
    ep = agent.run(SAMPLES[:1], GREEDY)[0]
    first = ep.turns[0]
    text, ids = render(tok, "search", None, problem=SAMPLES[0]["question"], memory=agent.initial_memory,
                       chunk="No search yet.")
    assert first.prompt_ids == ids and engine.calls[0][0].prompt_text == text
    assert engine.calls[0][0].params.stop == ("</search>",)
    assert first.logprobs == [-0.25] * len(first.completion_ids)
    assert "hallucinated" not in first.text  # generation stopped at </search>


def test_budgets_cap_responses_and_results(tok: Any, retriever: Retriever) -> None:
    engine = ScriptedEngine(_responder, tok)
    agent = SearchAgent(engine, tok, retriever, SearchAgentConfig(max_turns=3, results_tokens=12,
                                                                 response_tokens=400))
    ep = agent.run(SAMPLES[:1], GREEDY)[0]
    assert len(tok(ep.results[1], add_special_tokens=False)["input_ids"]) <= 12
    # the cut results never show "Doc 1 (Title: Berlin)", so the agent keeps searching until it runs out;
    # both searches that got results (the last turn's gets none) had them cut
    assert ep.outcome == "no_answer" and agent.stats["results_truncated"] == 2
    assert all(r.params.max_tokens == 400 for call in engine.calls for r in call)
    capped = SearchAgent(ScriptedEngine(_responder, tok), tok, retriever,
                         SearchAgentConfig(response_tokens=5))
    ep = capped.run(SAMPLES[:1], GREEDY)[0]
    assert ep.turns[0].hit_cap and ep.outcome == "malformed" and capped.stats["response_cap_hits"] == 1
    with pytest.raises(ValueError, match="max_turns=0"):
        SearchAgentConfig(max_turns=0)


def test_sampled_episodes_are_seeded(tok: Any, retriever: Retriever, tiny_model_dir: Path) -> None:
    """With the real (random-weight) model: seeded sampling reproduces episodes, and every turn's
    log-probs cover exactly its sampled tokens."""
    from memtrain.engines.hf import HFEngine
    from memtrain.models import load_policy

    engine = HFEngine(load_policy(str(tiny_model_dir), device="cpu"), tok, batch_size=8)
    cfg = SearchAgentConfig(max_turns=2, response_tokens=24)
    params = SamplingParams(temperature=1.0, seed=3)
    a = SearchAgent(engine, tok, retriever, cfg).run(SAMPLES[:2], params, n=2)
    b = SearchAgent(engine, tok, retriever, cfg).run(SAMPLES[:2], params, n=2)
    assert [[t.completion_ids for t in e.turns] for e in a] == \
        [[t.completion_ids for t in e.turns] for e in b]
    assert a[0].turns[0].completion_ids != a[1].turns[0].completion_ids  # the n episodes differ
    for e in a:
        assert e.outcome in ("answer", "malformed", "no_answer")
        for t in e.turns:
            assert len(t.logprobs) == len(t.completion_ids) <= 24


def test_searchqa_task_rollouts(tok: Any, retriever: Retriever) -> None:
    from memtrain.rl.rollout import SEARCH
    from memtrain.rl.tasks.registry import TASKS, check_rows, make_task
    from memtrain.rl.tasks.searchqa import SearchQATask

    cfg = load_config(None, ["train.task=searchqa", "search.max_turns=3", "search.retriever=unused"])
    assert TASKS["searchqa"] is SearchQATask
    task = SearchQATask(cfg, tok, backend=retriever)
    check_rows(task, SAMPLES, "samples")
    rollouts, stats = task.rollout(SAMPLES, ScriptedEngine(_responder, tok), GREEDY, 2, random.Random(0))
    assert [r.group for r in rollouts] == ["two/search"] * 2 + ["river/search"] * 2 + ["loop/search"] * 2
    assert [r.reward for r in rollouts] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert all(r.kind == SEARCH and all(t.kind == "search" for t in r.turns) for r in rollouts)
    assert rollouts[2].metrics["search_malformed_rate"] == 1.0
    assert rollouts[4].metrics["search_no_answer_rate"] == 1.0
    assert rollouts[0].metrics["search_em"] == 1.0 and rollouts[0].record["outcome"] == "answer"
    assert stats["search_malformed"] == 2.0
    with pytest.raises(ValueError, match=r"search\.retriever"):
        make_task(load_config(None, ["train.task=searchqa"]), tok)
    with pytest.raises(ValueError, match="objective_answers"):
        check_rows(task, [{"id": "x", "question": "q", "answers": ["a"]}], "rows")


def test_partial_objectives_score_half(tok: Any, retriever: Retriever) -> None:
    def respond(prompt: str, sample: int) -> str:
        return "<memory>m</memory> \\boxed{Berlin; 1900}"

    ep = SearchAgent(ScriptedEngine(respond, tok), tok, retriever).run(SAMPLES[:1], GREEDY)[0]
    assert ep.reward == 0.5 and re.fullmatch(r".*1900\}", ep.answer)
