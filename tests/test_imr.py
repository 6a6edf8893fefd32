"""IMR prompts: choice of k / l / entity (paper rule l < k), masking, filters, fallback NER and sampling."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from memtrain.agent.imr import ImrPrompt, build_imr_prompt, draw_imr_choice, run_imr
from memtrain.agent.loop import MemoryAgent
from memtrain.agent.types import Trajectory
from memtrain.config import AgentConfig
from memtrain.data.masking import mask_entity
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine, kind_responder
from memtrain.models import load_tokenizer
from memtrain.prompts import IMR_QUESTION, TARGET_TOKEN, render

PARAGRAPHS = [
    "Document 1: Marie Curie was born in Warsaw in 1867. Marie Curie later moved to Paris.",
    "Document 2: The Danube flows through Vienna and Budapest before it reaches the Black Sea.",
    "Document 3: Isaac Newton studied at Cambridge, and his Principia appeared in 1687.",
    "Document 4: Mount Fuji is the highest mountain of Japan and stands near Tokyo.",
]
CONTEXT = "\n\n".join(PARAGRAPHS)
ENTITIES = ["Marie Curie", "Warsaw", "1867", "Paris", "Danube", "Vienna", "Budapest", "the Black Sea",
            "Isaac Newton", "Cambridge", "1687", "Mount Fuji", "Japan", "Tokyo"]


def spans_of(context: str, entities: list[str]) -> list[dict]:
    return [{"start": m.start(), "end": m.end(), "label": "X"}
            for e in entities for m in re.finditer(re.escape(e), context)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def cfg(tok) -> AgentConfig:
    n = len(tok(CONTEXT, add_special_tokens=False)["input_ids"])
    return AgentConfig(chunk_tokens=-(-n // 4), memory_tokens=32, answer_tokens=16, max_chunks=4)


_reply = kind_responder({"memory": lambda f, _: "memory: " + " ".join(f["chunk"].split()[:2])},
                        default="\\boxed{Warsaw}")


def _run(tok, cfg: AgentConfig, sample: dict, reply=_reply) -> tuple[MemoryAgent, Trajectory]:
    agent = MemoryAgent(ScriptedEngine(reply, tok), tok, cfg)
    [traj] = agent.run([sample], SamplingParams(temperature=1.0), n=1)
    return agent, traj


def _sample(**kw) -> dict:
    return {"id": "s", "context": CONTEXT, "question": "Q?", "answers": ["x"],
            "entity_spans": spans_of(CONTEXT, ENTITIES), **kw}


def test_choices_follow_the_paper_rule_and_mask_every_occurrence(tok, cfg) -> None:
    sample = _sample()
    _, traj = _run(tok, cfg, sample)
    num_chunks = len(traj.chunks)
    assert num_chunks == 4
    ks, ls = Counter(), Counter()
    for seed in range(120):
        p = build_imr_prompt(traj, sample, tok, cfg, random.Random(seed), trajectory_index=5)
        assert p is not None and p.trajectory_index == 5
        assert 1 <= p.step_k <= num_chunks and 0 <= p.chunk_l < p.step_k
        lo, hi = traj.chunk_char_spans[p.chunk_l]
        assert any(lo <= s["start"] and s["end"] <= hi and CONTEXT[s["start"]:s["end"]] == p.entity
                   for s in sample["entity_spans"])
        masked, replaced = mask_entity(traj.chunks[p.chunk_l], p.entity, TARGET_TOKEN)
        assert replaced and p.entity.lower() not in masked.lower()
        text, ids = render(tok, "imr", problem=IMR_QUESTION, memory=traj.memories[p.step_k], chunk=masked)
        assert (p.prompt_text, p.prompt_ids, p.label) == (text, ids, p.entity)
        ks[p.step_k] += 1
        ls[p.chunk_l] += 1
    assert set(ks) == {1, 2, 3, 4} and set(ls) == {0, 1, 2, 3}
    assert ls[0] > ls[3]  # chunk 0 is eligible for every k, chunk 3 only for the final-step memory


def test_all_occurrences_in_the_chunk_are_masked(tok, cfg) -> None:
    sample = _sample(entity_spans=spans_of(CONTEXT, ["Marie Curie"]))
    _, traj = _run(tok, cfg, sample)
    p = build_imr_prompt(traj, sample, tok, cfg, random.Random(0))
    assert p is not None and p.entity == "Marie Curie" and p.chunk_l == 0
    chunk_in_prompt = p.prompt_text.split("Section:\n", 1)[1]
    assert chunk_in_prompt.count(TARGET_TOKEN) == traj.chunks[0].count("Marie Curie") == 2
    assert "Marie Curie" not in p.prompt_text


def test_entity_only_in_the_last_chunk_forces_the_final_step_memory(tok, cfg) -> None:
    sample = _sample(entity_spans=spans_of(CONTEXT, ["Tokyo"]))
    _, traj = _run(tok, cfg, sample)
    for seed in range(10):
        p = build_imr_prompt(traj, sample, tok, cfg, random.Random(seed))
        assert p is not None and (p.step_k, p.chunk_l, p.entity) == (4, 3, "Tokyo")


def test_none_when_no_valid_choice(tok, cfg) -> None:
    sample = _sample(entity_spans=[])
    agent, traj = _run(tok, cfg, sample)
    assert build_imr_prompt(traj, sample, tok, cfg, random.Random(0)) is None
    # memories left empty by the model are the initial text: no step is eligible
    blank = _sample()
    agent, traj = _run(tok, cfg, blank, kind_responder({"memory": ""}, default="\\boxed{x}"))
    assert agent.imr_prompts([traj], [blank], random.Random(0)) == [None]
    assert agent.stats["imr_none"] == 1 and agent.stats["imr_prompts"] == 0


def test_spans_crossing_a_chunk_boundary_are_never_chosen(tok, cfg) -> None:
    sample = _sample(entity_spans=spans_of(CONTEXT, ["the Black Sea", "Danube"]))
    _, traj = _run(tok, cfg, sample)
    [sea] = [sp for sp in sample["entity_spans"] if CONTEXT[sp["start"]:sp["end"]] == "the Black Sea"]
    assert sea["start"] < traj.chunk_char_spans[1][1] < sea["end"]  # really crosses chunks 1 and 2
    chosen = {build_imr_prompt(traj, sample, tok, cfg, random.Random(seed)).entity for seed in range(20)}
    assert chosen == {"Danube"}


def test_proxy_filters_exclude_frequent_and_malformed_entities(tok) -> None:
    context = "Rome " * 6 + "and Milan are cities. " + "Turin is north. " * 3 + "See [Turin]."
    sample = {"id": "f", "context": context, "question": "Q?", "answers": ["x"],
              "entity_spans": spans_of(context, ["Rome", "Milan", "[Turin]", "Turin"])}
    cfg = AgentConfig(chunk_tokens=1000, memory_tokens=8, answer_tokens=8, max_chunks=2)
    _, traj = _run(tok, cfg, sample)
    chosen = {build_imr_prompt(traj, sample, tok, cfg, random.Random(s)).entity for s in range(30)}
    assert chosen == {"Milan", "Turin"}  # Rome: 6 times (>= 5); [Turin]: brackets


def test_seeded_choice_is_reproducible(tok, cfg) -> None:
    sample = _sample()
    _, traj = _run(tok, cfg, sample)
    a = [build_imr_prompt(traj, sample, tok, cfg, random.Random(s)) for s in range(8)]
    b = [build_imr_prompt(traj, sample, tok, cfg, random.Random(s)) for s in range(8)]
    assert a == b and len({(p.step_k, p.chunk_l, p.entity) for p in a if p}) > 1


def test_fallback_ner_when_spans_are_absent(tok, cfg) -> None:
    sample = _sample()
    del sample["entity_spans"]
    _, traj = _run(tok, cfg, sample)
    calls: list[str] = []

    def capitals(text: str) -> list[tuple[int, int, str]]:
        calls.append(text)
        return [(m.start(), m.end(), "CAP") for m in re.finditer(r"\b(?:Vienna|Budapest)\b", text)]

    p = build_imr_prompt(traj, sample, tok, cfg, random.Random(1), ner=capitals)
    assert p is not None and p.entity in {"Vienna", "Budapest"} and p.entity_label == "CAP"
    assert calls and all(c in traj.chunks for c in calls)
    with pytest.raises(ValueError, match="no 'entity_spans' and no fallback ner"):
        build_imr_prompt(traj, sample, tok, cfg, random.Random(1))


def test_bad_spans_are_reported(tok, cfg) -> None:
    sample = _sample()
    _, traj = _run(tok, cfg, sample)
    sample["entity_spans"] = [{"start": 5, "end": 10 ** 6, "label": "X"}]
    with pytest.raises(ValueError, match=r"sample 's': entity_spans\[0\] = \[5, 1000000\) lies outside"):
        build_imr_prompt(traj, sample, tok, cfg, random.Random(0))
    sample["entity_spans"] = [{"begin": 1}]
    with pytest.raises(ValueError, match=r"entity_spans\[0\] = \{'begin': 1\}; expected"):
        build_imr_prompt(traj, sample, tok, cfg, random.Random(0))


def test_run_imr_samples_a_group_per_prompt(tok, cfg) -> None:
    sample = _sample()
    agent, traj = _run(tok, cfg, sample)
    prompts = agent.imr_prompts([traj, traj], [sample], random.Random(3))
    assert all(isinstance(p, ImrPrompt) for p in prompts) and [p.trajectory_index for p in prompts] == [0, 1]
    engine = ScriptedEngine(lambda prompt, j: f"\\boxed{{guess {j}}}", tok)
    groups = run_imr(engine, prompts, SamplingParams(temperature=1.0, seed=9), group_size=3, max_tokens=40)
    assert [len(g) for g in groups] == [3, 3]
    [call] = engine.calls
    assert [r.params.n for r in call] == [3, 3] and [r.params.max_tokens for r in call] == [40, 40]
    assert len({r.params.seed for r in call}) == 2
    for p, group in zip(prompts, groups, strict=True):
        assert all(t.kind == "imr" and t.step == p.step_k and t.prompt_ids == p.prompt_ids for t in group)
        assert [t.text for t in group] == ["\\boxed{guess 0}", "\\boxed{guess 1}", "\\boxed{guess 2}"]
        assert not any(t.hit_cap for t in group)
    assert agent.stats["imr_prompts"] == 2


@pytest.mark.slow
def test_spacy_as_fallback_ner(tok, cfg, spacy_model_dir: str) -> None:
    from memtrain.data.entities import load_ner

    nlp = load_ner(spacy_model_dir)
    sample = _sample()
    del sample["entity_spans"]
    _, traj = _run(tok, cfg, sample)
    p = build_imr_prompt(traj, sample, tok, cfg, random.Random(0),
                         ner=lambda text: [(e.start_char, e.end_char, e.label_) for e in nlp(text).ents])
    assert p is not None and p.entity in traj.chunks[p.chunk_l] and p.entity_label
    assert TARGET_TOKEN in p.prompt_text


def test_target_masking_follows_the_rules_of_the_proxy_data(tok) -> None:
    """[TARGET] hides the entity and its variants (determiner-less form, surname) but never a common word."""
    context = ("In May the Curie lab may grow; the United States told us. Marie Curie met one friend. "
               "Curie won twice in the United States.")
    named = [("May", "DATE"), ("the United States", "GPE"), ("Marie Curie", "PERSON"), ("one", "CARDINAL")]
    spans = [{"start": m.start(), "end": m.end(), "label": lab}
             for e, lab in named for m in re.finditer(re.escape(e), context)]
    sample = {"id": "v", "context": context, "question": "Q?", "answers": ["x"], "entity_spans": spans}
    cfg = AgentConfig(chunk_tokens=1000, memory_tokens=8, answer_tokens=8, max_chunks=2)
    _, traj = _run(tok, cfg, sample)
    prompts = {}
    for seed in range(40):
        p = build_imr_prompt(traj, sample, tok, cfg, random.Random(seed))
        prompts[p.label] = p.prompt_text.split("Section:\n", 1)[1]
    assert set(prompts) == {"May", "United States", "Marie Curie"}  # "one" is a common word; no "the"
    assert "In [TARGET] the Curie lab may grow" in prompts["May"]
    assert "United States" not in prompts["United States"] and "told us" in prompts["United States"]
    assert "Curie" not in prompts["Marie Curie"] and prompts["Marie Curie"].count(TARGET_TOKEN) == 3


def test_a_header_number_is_never_an_imr_target(tok) -> None:
    """An entity equal to a ``Document N:`` header number (N within the document's headers) would turn the
    header into ``Document [TARGET]:`` between ``Document 11:`` and ``Document 13:``: never drawn. A larger
    number, or a name, still is."""
    passages = [f"Document {i}:\nThe {i} ships of Rome sailed." for i in range(1, 14)]
    passages[5] = "Document 6:\nIn 12 days Caesar took 120 ships to Rome."
    context = "\n\n".join(passages)
    start = context.index("In 12 days")
    found = [(context.index(text, start), text, lab) for text, lab in
             (("12", "CARDINAL"), ("120", "CARDINAL"), ("Caesar", "PERSON"))]  # header 12 exists, 120 not
    spans = [{"start": at, "end": at + len(text), "label": lab} for at, text, lab in found]
    sample = {"id": "h", "context": context, "question": "Q?", "answers": ["x"], "entity_spans": spans}
    cfg = AgentConfig(chunk_tokens=100_000, memory_tokens=8, answer_tokens=8, max_chunks=2)
    _, traj = _run(tok, cfg, sample)
    labels = {build_imr_prompt(traj, sample, tok, cfg, random.Random(seed)).label for seed in range(40)}
    assert labels == {"120", "Caesar"}
    choices = {draw_imr_choice(traj, sample, random.Random(seed)).entity for seed in range(40)}
    assert choices == {"120", "Caesar"}


def test_the_trajectories_of_a_sample_share_the_chunk_entity_work(tok, cfg, monkeypatch) -> None:
    """G1 trajectories read the same chunks: their maskable entities are computed once per chunk, and the
    draws are the same as without the cache."""
    import memtrain.agent.imr as imr

    sample = _sample()
    agent = MemoryAgent(ScriptedEngine(_reply, tok), tok, cfg)
    trajs = agent.run([sample], SamplingParams(temperature=1.0), n=4)
    calls = []
    real = imr._chunk_entities
    monkeypatch.setattr(imr, "_chunk_entities", lambda *a: calls.append(a[2]) or real(*a))
    cached = agent.imr_prompts(trajs, [sample], random.Random(3))
    assert sorted(calls) == sorted(set(calls)) and len(calls) <= len(trajs[0].chunks)
    rng = random.Random(3)
    uncached = [build_imr_prompt(t, sample, tok, cfg, rng, trajectory_index=i) for i, t in enumerate(trajs)]
    assert cached == uncached
