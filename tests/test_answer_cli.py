"""``memtrain answer``: progress, memories and answer on the tiny model and SmolLM2, identical prompts to the
shared agent loop, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import memtrain.eval.runner as eval_runner
from memtrain.agent.loop import MemoryAgent
from memtrain.cli import answer as answer_cli
from memtrain.cli.main import build_parser, main
from memtrain.config import AgentConfig
from memtrain.engines.base import SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_policy, load_tokenizer

DOC = " ".join(f"Fact {i}: the box number {i} is painted red and weighs {i + 2} kilos." for i in range(12))
QUESTION = "How much does box 3 weigh?"


@pytest.fixture()
def doc_file(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC, encoding="utf-8")
    return path


def test_answer_runs_the_shared_loop_with_identical_prompts(tiny_model_dir: Path, doc_file: Path,
                                                            capsys, monkeypatch) -> None:
    sent: list[list[int]] = []
    make = eval_runner.load_engine  # memtrain answer loads its engine as memtrain eval does

    def recording_engine(cfg, engine=None, tokenizer=None):
        engine, tokenizer = make(cfg, engine, tokenizer)
        generate = engine.generate

        def record(requests):
            sent.extend(r.prompt_ids for r in requests)
            return generate(requests)

        engine.generate = record
        return engine, tokenizer

    monkeypatch.setattr(eval_runner, "load_engine", recording_engine)
    rc = main(["answer", "--model", str(tiny_model_dir), "--document", str(doc_file), "--question", QUESTION,
               "--chunk-tokens", "120", "--memory-tokens", "10", "--answer-tokens", "8", "--max-chunks", "3",
               "--show-memory"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "tokens -> 3 chunks of <= 120, truncated (centre)" in err
    assert [line.split(" read")[0] for line in err.splitlines() if line.startswith("chunk ")] == [
        "chunk 1/3", "chunk 2/3", "chunk 3/3"]
    assert "answered with" in err

    # The same document through MemoryAgent directly (what training and `memtrain eval` run), greedy.
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = AgentConfig(chunk_tokens=120, memory_tokens=10, answer_tokens=8, max_chunks=3)
    agent = MemoryAgent(HFEngine(load_policy(str(tiny_model_dir), device="cpu"), tok), tok, cfg)
    [traj] = agent.run([{"id": "x", "context": DOC, "question": QUESTION, "answers": ["5 kilos"]}],
                       SamplingParams(temperature=0.0), n=1)
    assert sent == [t.prompt_ids for t in traj.turns]
    expected = "".join(f"=== memory after chunk {t}/3 ===\n{m}\n\n"
                       for t, m in enumerate(traj.memories[1:], 1))
    assert out == expected + "=== answer ===\n" + traj.answer + "\n"


def test_missing_document_and_bad_flags_are_one_line_errors(tmp_path: Path, doc_file: Path, capsys) -> None:
    assert main(["answer", "--document", str(tmp_path / "nope.txt"), "--question", "q"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["answer", "--document", str(doc_file), "--question", "q", "--memory-tokens", "0"]) == 1
    assert "--memory-tokens 0: Input should be greater than 0" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert main(["answer", "--document", str(empty), "--question", "q"]) == 1
    assert "the file is empty" in capsys.readouterr().err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    assert main(["answer", "--document", str(binary), "--question", "q"]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: some-model}\nagent: {chunk_tokens: 64, max_chunks: 2}\n",
                        encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(["answer", "--config", str(cfg_file), "--document", "d", "--question", "q",
                              "--max-chunks", "5", "--engine", "openai", "--base-url", "http://h:1/v1"])
    cfg = answer_cli.build_config(args)
    assert (cfg.model.name, cfg.agent.chunk_tokens, cfg.agent.max_chunks) == ("some-model", 64, 5)
    assert (cfg.engine.kind, cfg.engine.base_url) == ("openai", "http://h:1/v1")


@pytest.mark.slow
def test_answer_with_smollm2(doc_file: Path, capsys) -> None:
    rc = main(["answer", "--model", "smollm2-135m", "--document", str(doc_file), "--question", QUESTION,
               "--chunk-tokens", "64", "--memory-tokens", "8", "--answer-tokens", "8", "--max-chunks", "2"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    assert "chunk 2/2 read" in err and "truncated (centre)" in err
