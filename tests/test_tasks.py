"""Rollout tasks: exact E2E + IMR rewards with a scripted engine, group ids, missing IMR, registry, session
shapes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from memtrain.config import load_config
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.errors import UserError
from memtrain.models import load_tokenizer
from memtrain.rl.rollout import E2E, IMR, SEARCH, GroupKind, SessionShape
from memtrain.rl.tasks.longqa import LongQATask
from memtrain.rl.tasks.proxy import ProxyTask
from memtrain.rl.tasks.registry import TASKS, check_rows, make_task, register_task, task_class
from memtrain.rl.tasks.searchqa import SearchQATask
from train_helpers import scripted_responder, scripted_rows

AGENT = ["agent.chunk_tokens=12", "agent.max_chunks=4", "agent.memory_tokens=16", "agent.answer_tokens=16"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _run(task, tokenizer):
    engine = ScriptedEngine(scripted_responder, tokenizer)
    return task.rollout(scripted_rows(), engine, SamplingParams(temperature=1.0, seed=3), 2, random.Random(0))


def test_proxy_rewards_are_match_plus_lambda_over_g2_imr_sum(tokenizer) -> None:
    config = load_config(None, [*AGENT, "rl.group_size=2", "rl.imr_group_size=2", "rl.imr_lambda=0.5"])
    rollouts, counters = _run(ProxyTask(config, tokenizer), tokenizer)
    e2e = [r for r in rollouts if r.kind == E2E]
    imr = [r for r in rollouts if r.kind == IMR]
    assert all(r.primary for r in e2e) and not any(r.primary for r in imr)
    # sample-major: A's two trajectories, then B's
    assert [r.group for r in e2e] == ["A/e2e", "A/e2e", "B/e2e", "B/e2e"]
    # A: trajectory 0 answers France (match 1), trajectory 1 Spain (0); each gets IMR matches [1, 0]
    # -> bonus 0.5 / 2 * 1 = 0.25. B: wrong answer, no entity -> no IMR prompt, no bonus.
    assert [r.reward for r in e2e] == pytest.approx([1.25, 0.25, 0.0, 0.0])
    assert [r.metrics["e2e_match"] for r in e2e] == [1.0, 0.0, 0.0, 0.0]
    assert [r.metrics["imr_prompt_found"] for r in e2e] == [1.0, 1.0, 0.0, 0.0]
    assert counters["imr_none"] == 2 and counters["imr_prompts"] == 2
    # one IMR group of G2 = 2 answers per trajectory of A, each a single 'imr' turn
    assert [r.group for r in imr] == ["A/0/imr", "A/0/imr", "A/1/imr", "A/1/imr"]
    assert [r.reward for r in imr] == [1.0, 0.0, 1.0, 0.0]
    assert all(len(r.turns) == 1 and r.turns[0].kind == "imr" for r in imr)
    assert all(r.record["label"] == "Paris" for r in imr)
    # every turn of a trajectory is there: one memory turn per chunk, then the final answer
    for r in e2e:
        kinds = [t.kind for t in r.turns]
        assert kinds == ["memory"] * r.record["num_chunks"] + ["final"]
        assert r.record["num_chunks"] >= 2
        assert r.record["memories"][1:] == ["noted the city"] * r.record["num_chunks"]
    assert e2e[0].record["imr"]["label"] == "Paris" and e2e[0].record["imr"]["matches"] == [1.0, 0.0]
    assert e2e[2].record["imr"] is None


def test_proxy_lambda_and_imr_switch(tokenizer) -> None:
    config = load_config(None, [*AGENT, "rl.imr_group_size=2", "rl.imr_lambda=2.0"])
    rollouts, _ = _run(ProxyTask(config, tokenizer), tokenizer)
    assert [r.reward for r in rollouts if r.kind == E2E] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    off = load_config(None, [*AGENT, "rl.imr=false"])
    rollouts, counters = _run(ProxyTask(off, tokenizer), tokenizer)
    assert {r.kind for r in rollouts} == {E2E}
    assert [r.reward for r in rollouts] == [1.0, 0.0, 0.0, 0.0]
    assert counters["imr_prompts"] == 0


def test_longqa_reward_is_strict_em_of_the_final_answer(tokenizer) -> None:
    config = load_config(None, [*AGENT, "train.task=longqa"])
    task = make_task(config, tokenizer)
    assert isinstance(task, LongQATask)
    rows = scripted_rows()
    rows[0]["answers"] = ["Germany", "France"]  # scored against ALL golds
    rollouts, _ = task.rollout(
        rows, ScriptedEngine(scripted_responder, tokenizer), SamplingParams(), 2, random.Random(0)
    )
    assert [(r.group, r.kind, r.reward) for r in rollouts] == [
        ("A/e2e", E2E, 1.0),
        ("A/e2e", E2E, 0.0),
        ("B/e2e", E2E, 0.0),
        ("B/e2e", E2E, 0.0),
    ]
    assert rollouts[0].metrics["e2e_em"] == 1.0 and rollouts[1].metrics["e2e_f1"] == 0.0


def test_reward_metric_overrides_the_tasks_default(tokenizer) -> None:
    """rl.reward_metric=f1: partial credit where strict EM gives none (and the task says which it used)."""
    rows = scripted_rows()
    rows[0]["answers"] = ["Republic of France"]  # the scripted answer "France": f1 = 2 * 1 * (1/3) / (4/3)
    engine = ScriptedEngine(scripted_responder, tokenizer)
    rewards = {}
    for metric in (None, "f1"):
        over = [*AGENT, "train.task=longqa"] + ([f"rl.reward_metric={metric}"] if metric else [])
        task = make_task(load_config(None, over), tokenizer)
        assert task.reward_metric == (metric or "strict_em")
        rollouts, _ = task.rollout(rows, engine, SamplingParams(), 2, random.Random(0))
        rewards[metric] = [r.reward for r in rollouts]
        assert [r.metrics["e2e_match"] for r in rollouts] == rewards[metric]
    assert rewards[None] == [0.0, 0.0, 0.0, 0.0]
    assert rewards["f1"] == pytest.approx([0.5, 0.0, 0.0, 0.0])
    with pytest.raises(UserError, match=r"rl.reward_metric='bleu': no such reward; registered: .*span_f1"):
        make_task(load_config(None, [*AGENT, "train.task=longqa", "rl.reward_metric=bleu"]), tokenizer)


def test_registry_and_row_checks(tokenizer, monkeypatch) -> None:
    assert set(TASKS) >= {"proxy", "longqa", "searchqa"}
    assert isinstance(make_task(load_config(None, ["train.task=longqa"]), tokenizer), LongQATask)
    monkeypatch.delitem(TASKS, "searchqa")  # a task whose module did not register itself
    with pytest.raises(UserError, match=r"^train\.task 'searchqa' has no registered task \(registered: "
                                        r"(\w+, )*longqa, proxy(, \w+)*\)"):
        make_task(load_config(None, ["train.task=searchqa"]), tokenizer)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"task 'proxy' is already registered \(memtrain\.rl\.tasks\.proxy"):
        register_task("proxy")(LongQATask)
    assert TASKS["proxy"] is ProxyTask and task_class("longqa").name == "longqa"
    task = ProxyTask(load_config(None, AGENT), tokenizer)
    rows = scripted_rows()
    del rows[1]["entity_spans"]
    with pytest.raises(ValueError, match=r"row 1 \(id 'B'\) lacks entity_spans.*train.task='proxy'"):
        check_rows(task, rows, "data/x")
    with pytest.raises(ValueError, match="no rows"):
        check_rows(task, [], "data/x")
    rows = scripted_rows()
    rows[0]["answers"] = []
    with pytest.raises(ValueError, match="sample 'A': no gold 'answers'"):
        _run_rows(task, tokenizer, rows)


def _run_rows(task, tokenizer, rows):
    return task.rollout(
        rows, ScriptedEngine(scripted_responder, tokenizer), SamplingParams(), 2, random.Random(0)
    )


def test_group_kinds_name_their_groups() -> None:
    assert (E2E.group_id("A"), SEARCH.group_id("A"), IMR.group_id("A", 1)) == ("A/e2e", "A/search", "A/1/imr")
    assert E2E.primary and SEARCH.primary and not IMR.primary
    with pytest.raises(ValueError, match="a secondary group needs a member index"):
        IMR.group_id("A")
    with pytest.raises(ValueError, match="a primary group takes no member index"):
        GroupKind("toy", primary=True).group_id("A", 0)


def test_session_shapes_and_budget_checks(tiny_model_dir: Path) -> None:
    """What a session asks of the model (verl sizes its batches by it) and the pre-flight context checks,
    each task its own: IMR answers only where the proxy task trains IMR, search turns sized by search.*."""
    paper = load_config(None, [])  # 1024 instruction + 5120 chunk + 1024 memory; 8 chunks; G2 = 8
    assert ProxyTask.session_shape(paper) == SessionShape(8 + 1 + 8, 7168, 1024)
    assert ProxyTask.session_shape(load_config(None, ["rl.imr=false"])).calls == 9
    assert LongQATask.session_shape(paper) == SessionShape(9, 7168, 1024)
    search = load_config(None, ["search.max_turns=3", "search.results_tokens=500",
                                "search.response_tokens=2000"])
    assert SearchQATask.session_shape(search) == SessionShape(3, 1024 + 500 + 1024, 2000)
    with pytest.raises(ValueError, match=r"agent\.max_chunks is null"):
        LongQATask.session_shape(load_config(None, ["agent.max_chunks=null"]))
    # the tiny model has 8192 positions: these budgets fit every memory-agent turn but the IMR turn
    tight = [f"model.name={tiny_model_dir}", "agent.instruction_tokens=3000", "agent.chunk_tokens=200",
             "agent.memory_tokens=2000", "agent.answer_tokens=3000"]
    LongQATask.check_budgets(load_config(None, tight))
    ProxyTask.check_budgets(load_config(None, [*tight, "rl.imr=false"]))
    with pytest.raises(ValueError, match=r"\(IMR turn\) = 8200 tokens > .*8192 positions"):
        ProxyTask.check_budgets(load_config(None, tight))
    SearchQATask.check_budgets(load_config(None, tight))
