"""The agent loop: exact control flow with the scripted engine, and the real hf engine end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from memtrain.agent.loop import MemoryAgent
from memtrain.config import AgentConfig
from memtrain.engines.base import SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.engines.scripted import ScriptedEngine, kind_responder
from memtrain.models import load_policy, load_tokenizer
from memtrain.prompts import INITIAL_MEMORY, parse, render
from memtrain.scoring import METRICS

LONG = " ".join(f"Fact {i}: the box {i} is red." for i in range(40))
SHORT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _samples() -> list[dict]:
    return [{"id": "long", "context": LONG, "question": "Which box is red?", "answers": ["box 3"]},
            {"id": "short", "context": SHORT, "question": "What is the capital of France?",
             "answers": ["Paris", "Paris, France"]}]


# Memory = 'seen <first words of the chunk>'; the final answer is boxed Paris.
_memory_replier = kind_responder({"memory": lambda f, _: "seen " + " ".join(f["chunk"].split()[:3]),
                                  "final": "\\boxed{Paris}"})


def _cfg(**kw) -> AgentConfig:
    base = {"chunk_tokens": 60, "memory_tokens": 32, "answer_tokens": 16, "max_chunks": 4}
    return AgentConfig(**{**base, **kw})


def test_short_documents_finish_without_waiting(tok) -> None:
    engine = ScriptedEngine(_memory_replier, tok)
    agent = MemoryAgent(engine, tok, _cfg())
    trajs = agent.run(_samples(), SamplingParams(temperature=1.0), n=1)
    long_t, short_t = trajs
    assert len(long_t.chunks) == 4 and long_t.truncated and len(short_t.chunks) == 1
    # wave 1: both memory steps; wave 2: the short document's FINAL turn next to the long one's memory step
    kinds = [[parse("memory", tok.decode(r.prompt_ids)) is not None for r in call] for call in engine.calls]
    assert kinds == [[True, True], [True, False], [True], [True], [False]]
    assert [t.kind for t in short_t.turns] == ["memory", "final"]
    assert [t.kind for t in long_t.turns] == ["memory"] * 4 + ["final"]
    assert [t.step for t in long_t.turns] == [0, 1, 2, 3, 4]
    assert short_t.answer == "\\boxed{Paris}" and short_t.scores["strict_em"] == 1.0
    assert set(short_t.scores) == set(METRICS) and long_t.scores["strict_em"] == 0.0
    assert agent.stats["waves"] == 5 and agent.stats["truncated_docs"] == 1
    assert agent.stats["memory_turns"] == 5 and agent.stats["final_turns"] == 2


def test_turns_hold_exactly_what_the_engine_got_and_returned(tok) -> None:
    engine = ScriptedEngine(_memory_replier, tok, logprob=-0.25)
    agent = MemoryAgent(engine, tok, _cfg())
    samples = _samples()
    [traj, _] = agent.run(samples, SamplingParams(temperature=1.0), n=1)
    sent = [r.prompt_ids for call in engine.calls for r in call if "Fact" in tok.decode(r.prompt_ids)
            or "Which box" in tok.decode(r.prompt_ids)]
    assert [t.prompt_ids for t in traj.turns] == sent
    for t, turn in enumerate(traj.turns[:-1]):
        _, ids = render(tok, "memory", problem=samples[0]["question"], memory=traj.memories[t],
                        chunk=traj.chunks[t])
        assert turn.prompt_ids == ids
        assert turn.completion_ids[-1] == tok.eos_token_id and not turn.hit_cap
        assert turn.logprobs == [-0.25] * len(turn.completion_ids)
        assert traj.memories[t + 1] == turn.text == "seen " + " ".join(traj.chunks[t].split()[:3])
    _, ids = render(tok, "final", problem=samples[0]["question"], memory=traj.memories[-1])
    assert traj.turns[-1].prompt_ids == ids
    assert traj.memories[0] == INITIAL_MEMORY and len(traj.memories) == len(traj.chunks) + 1


def test_memory_cap_truncates_and_is_counted(tok) -> None:
    long_memory = "memory " * 50
    engine = ScriptedEngine(kind_responder({"memory": long_memory}, default="\\boxed{x}"), tok)
    agent = MemoryAgent(engine, tok, _cfg(memory_tokens=5))
    [traj, _] = agent.run(_samples(), SamplingParams(temperature=0.0), n=1)
    mem_turns = traj.memory_turns
    assert all(t.hit_cap and len(t.completion_ids) == 5 and tok.eos_token_id not in t.completion_ids
               for t in mem_turns)
    expected = tok.decode(tok(long_memory, add_special_tokens=False)["input_ids"][:5]).strip()
    assert traj.memories[1] == expected
    assert expected in tok.decode(traj.turns[1].prompt_ids)  # the capped memory is what the next step reads
    assert agent.stats["memory_cap_hits"] == 5 and agent.stats["answer_cap_hits"] == 0
    assert agent.cap_rates() == {"memory_cap_rate": 1.0, "answer_cap_rate": 0.0}


def test_answer_cap_is_counted(tok) -> None:
    engine = ScriptedEngine(kind_responder({"memory": "m"}, default="a very long answer " * 20), tok)
    agent = MemoryAgent(engine, tok, _cfg(answer_tokens=4))
    trajs = agent.run(_samples()[1:], SamplingParams(temperature=1.0), n=2)
    assert all(t.final_turn.hit_cap and len(t.final_turn.completion_ids) == 4 for t in trajs)
    assert agent.stats["answer_cap_hits"] == 2


def test_empty_memory_falls_back_to_the_initial_text(tok) -> None:
    engine = ScriptedEngine(kind_responder({"memory": "   "}, default="\\boxed{x}"), tok)
    agent = MemoryAgent(engine, tok, _cfg())
    [traj] = agent.run(_samples()[1:], SamplingParams(temperature=1.0), n=1)
    assert traj.memories == [INITIAL_MEMORY, INITIAL_MEMORY] and traj.empty_memories == [0]
    assert agent.stats["empty_memories"] == 1


def test_samples_are_grouped_and_returned_sample_major(tok) -> None:
    seen: list[int] = []

    def reply(prompt: str, sample: int) -> str:
        seen.append(sample)
        return f"memory from sample {sample}" if parse("memory", prompt) else f"\\boxed{{{sample}}}"

    engine = ScriptedEngine(reply, tok)
    agent = MemoryAgent(engine, tok, _cfg())
    trajs = agent.run(_samples(), SamplingParams(temperature=1.0, seed=7), n=3)
    assert [t.sample_index for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert [t.sample_id for t in trajs] == ["long"] * 3 + ["short"] * 3
    # step 0 of a sample: one request with n=3 (one prefill); afterwards memories differ -> n=1 each
    assert [r.params.n for r in engine.calls[0]] == [3, 3]
    assert [r.params.n for r in engine.calls[1]] == [1] * 6
    assert {t.memories[1] for t in trajs[:3]} == {f"memory from sample {j}" for j in range(3)}
    seeds = [r.params.seed for call in engine.calls for r in call]
    assert len(set(seeds)) == len(seeds) and None not in seeds
    engine2 = ScriptedEngine(reply, tok)
    MemoryAgent(engine2, tok, _cfg()).run(_samples(), SamplingParams(temperature=1.0, seed=7), n=3)
    assert [r.params.seed for call in engine2.calls for r in call] == seeds
    assert all(r.params.max_tokens == 32 for r in engine.calls[0])


def test_greedy_n_shares_one_completion(tok) -> None:
    engine = ScriptedEngine(_memory_replier, tok)
    trajs = MemoryAgent(engine, tok, _cfg()).run(_samples(), SamplingParams(temperature=0.0), n=4)
    assert all(r.params.n == 1 for call in engine.calls for r in call)
    assert len(engine.calls[0]) == 2 and len(trajs) == 8
    assert len({tuple(t.memories) for t in trajs[:4]}) == 1


def test_greedy_and_sampled_runs_render_identical_prompts(tok) -> None:
    """Training (sampled) and evaluation/answer (greedy) see byte-identical prompts for the same states."""
    runs = []
    for params in (SamplingParams(temperature=1.0, top_p=0.9, seed=3), SamplingParams(temperature=0.0)):
        trajs = MemoryAgent(ScriptedEngine(_memory_replier, tok), tok, _cfg()).run(_samples(), params, n=1)
        runs.append([[t.prompt_ids for t in traj.turns] for traj in trajs])
    assert runs[0] == runs[1]


def test_scores_need_golds_and_bad_samples_fail_early(tok) -> None:
    engine = ScriptedEngine(_memory_replier, tok)
    agent = MemoryAgent(engine, tok, _cfg())
    [traj] = agent.run([{"id": "q", "context": SHORT, "question": "Capital?"}], SamplingParams(), n=1)
    assert traj.scores == {} and traj.answer == "\\boxed{Paris}"
    with pytest.raises(ValueError, match=r"sample 1 \(id 'b'\): 'question' must be a non-empty string"):
        agent.run([_samples()[0], {"id": "b", "context": "x", "question": ""}], SamplingParams())
    with pytest.raises(ValueError, match="'answers' must be a list of strings"):
        agent.run([{"id": "c", "context": "x", "question": "q", "answers": [1]}], SamplingParams())
    assert engine.calls == [engine.calls[0], *engine.calls[1:]] and agent.stats["documents"] == 1


def test_templates_from_config_reach_the_engine(tok) -> None:
    cfg = _cfg(templates={"initial_memory": "EMPTY-MEM", "final": "FINAL {problem} / {memory} \\boxed{}"})
    engine = ScriptedEngine(kind_responder({"memory": "m", "final": "\\boxed{Paris}"}, cfg.templates), tok)
    [traj] = MemoryAgent(engine, tok, cfg).run(_samples()[1:], SamplingParams(), n=1)
    assert traj.answer == "\\boxed{Paris}"  # the overridden final prompt was recognised as one
    assert "EMPTY-MEM" in tok.decode(traj.turns[0].prompt_ids)
    assert f"FINAL {_samples()[1]['question']} / {traj.memories[1]}" in tok.decode(traj.turns[1].prompt_ids)


def _recompute_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_hf_engine_end_to_end_with_exact_old_logprobs(tiny_model_dir: Path, tok) -> None:
    """Real tiny model: mixed memory/final batches; stored log-probs equal a full forward over exactly the
    stored prompt + completion (what the trainer recomputes)."""
    model = load_policy(str(tiny_model_dir), device="cpu")
    agent = MemoryAgent(HFEngine(model, tok, batch_size=8), tok, _cfg(memory_tokens=12, answer_tokens=8))
    trajs = agent.run(_samples(), SamplingParams(temperature=1.0, seed=11), n=2)
    assert [len(t.turns) for t in trajs] == [5, 5, 2, 2]
    for traj in trajs:
        for t, turn in enumerate(traj.turns):
            cap = 8 if turn.kind == "final" else 12
            assert 0 < len(turn.completion_ids) <= cap and turn.hit_cap == (len(turn.completion_ids) == cap
                                                                          and turn.completion_ids[-1] != 2)
            recomputed = _recompute_logprobs(model, turn.prompt_ids, turn.completion_ids)
            assert torch.allclose(recomputed, torch.tensor(turn.logprobs), atol=1e-4)
            if turn.kind == "memory":
                body = [i for i in turn.completion_ids if i != tok.eos_token_id]
                text = tok.decode(body, skip_special_tokens=True).strip()
                assert traj.memories[t + 1] == (text or INITIAL_MEMORY)
    again = MemoryAgent(HFEngine(model, tok, batch_size=3), tok, agent.config).run(
        _samples(), SamplingParams(temperature=1.0, seed=11), n=2)
    assert [t.answer for t in again] == [t.answer for t in trajs]  # seeded: independent of batching


@pytest.mark.slow
def test_smollm2_smoke(smollm2_dir: str) -> None:
    tok = load_tokenizer(smollm2_dir)
    model = load_policy(smollm2_dir, device="cpu")
    sample = {"id": "eiffel", "question": "When was the Eiffel Tower completed?", "answers": ["1889"],
              "context": "The Eiffel Tower is a wrought-iron tower in Paris. It was completed in 1889 "
                         "for the World's Fair. " * 4}
    agent = MemoryAgent(HFEngine(model, tok), tok, AgentConfig(chunk_tokens=24, memory_tokens=8,
                                                               answer_tokens=8, max_chunks=2))
    [traj] = agent.run([sample], SamplingParams(temperature=0.0), n=1)
    assert len(traj.chunks) == 2 and [t.kind for t in traj.turns] == ["memory", "memory", "final"]
    bos = tok.bos_token_id
    assert all(t.prompt_ids[0] == bos and t.prompt_ids[1] != bos for t in traj.turns)
    assert all(re.search(r"\w", m) for m in traj.memories[1:])
    assert set(traj.scores) == set(METRICS)


def test_a_problem_over_the_instruction_budget_is_an_error_naming_the_sample(tok) -> None:
    """docs/method.md section 1: instruction + problem get 1024 tokens; more would silently eat the
    context."""
    agent = MemoryAgent(ScriptedEngine(_memory_replier, tok), tok, _cfg())
    fits = len(agent.memory_prompt(_samples()[1]["question"], "", "")[1])
    agent = MemoryAgent(ScriptedEngine(_memory_replier, tok), tok, _cfg(instruction_tokens=fits))
    assert len(agent.run(_samples()[1:], SamplingParams(temperature=1.0), n=1)) == 1  # exactly at the budget
    long_question = {**_samples()[1], "id": "wordy", "question": "Why? " * 2000}
    calls = len(agent.engine.calls)
    with pytest.raises(ValueError, match=r"sample 1 \(id 'wordy'\): instruction \+ problem take \d+ tokens, "
                                         r"over agent.instruction_tokens=\d+"):
        agent.run([_samples()[1], long_question], SamplingParams(temperature=1.0), n=1)
    assert len(agent.engine.calls) == calls  # nothing was generated for the failing batch


def test_token_ids_the_tokenizer_does_not_know_never_reach_the_next_prompt(tiny_model_dir: Path, tok) -> None:
    """Qwen's embedding has more rows than its tokenizer has tokens, so a sampler can emit an id that decodes
    to nothing (MemAgent issue #25 crashes on one). The memory goes through text: the next prompt is
    re-tokenized and holds only known ids, while the turn keeps the sampled ids for training."""
    torch.manual_seed(0)
    model = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    known = len(tok)
    model.resize_token_embeddings(known + 256, mean_resizing=False)
    out = model.get_output_embeddings().weight
    with torch.no_grad():  # the extra rows of the output layer win many samples
        out[known:] = torch.randn_like(out[known:]) * 4.0 * out[:known].std()
    agent = MemoryAgent(HFEngine(model, tok), tok, _cfg(memory_tokens=12))
    trajs = agent.run(_samples(), SamplingParams(temperature=1.0, seed=3), n=2)
    turns = [t for traj in trajs for t in traj.turns]
    assert any(i >= known for t in turns for i in t.completion_ids)  # unknown ids were sampled
    for traj in trajs:
        for turn in traj.turns[1:]:
            assert max(turn.prompt_ids) < known  # never in a prompt
        assert all(max(t.completion_ids, default=0) < known + 256 for t in traj.turns)
