"""`memtrain eval longqa`: memory and full-context modes, per-length reports, resume, and the evaluation
protocol (every chunk read unless --max-chunks, MemAgent's decoding, both recorded in the summary)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from memtrain.cli.main import main
from memtrain.config import Config, load_config
from memtrain.data.longqa import HotpotExample, build_longqa, read_hotpotqa, write_longqa
from memtrain.engines.scripted import ScriptedEngine
from memtrain.eval.longqa import run_longqa_eval
from memtrain.eval.report import EXAMPLES, PLOT, SUMMARY, TABLE
from memtrain.io import read_jsonl
from memtrain.precision import compute_dtype_name
from memtrain.prompts import parse
from memtrain.scoring import METRICS

SMALL_AGENT = ["agent.chunk_tokens=200", "agent.memory_tokens=32", "agent.answer_tokens=16",
               "agent.max_chunks=3"]


def _examples(n: int = 12) -> list[HotpotExample]:
    out = []
    for i in range(n):
        paras = tuple((f"Title {i}-{j}", f"Paragraph {j} of question {i} says {i * 10 + j}.")
                      for j in range(4))
        out.append(HotpotExample(id=f"q{i}", question=f"What is the value of item {i}?", answer=f"value {i}",
                                 paragraphs=paras, gold_titles=(f"Title {i}-0", f"Title {i}-1")))
    return out


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lq") / "set"
    write_longqa(out, build_longqa(_examples(), [4, 12], 3, seed=0), {})
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from memtrain.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _cfg(tiny_model_dir: Path, extra: list[str] | None = None) -> Config:
    return load_config(None, [f"model.name={tiny_model_dir}", *SMALL_AGENT, *(extra or [])])


def respond(prompt: str, sample: int) -> str:
    """Memory turns keep a note; the final turn answers right for even items, wrong for odd ones."""
    i = int(re.search(r"value of item (\d+)\?", prompt).group(1))
    if parse("memory", prompt) is not None:
        return f"note about item {i}"
    if parse("full_context", prompt) is not None:
        return f"\\boxed{{value {i}}}"
    return f"The answer is \\boxed{{value {i}}}" if i % 2 == 0 else "\\boxed{unknown}"


def _final_requests(engine: ScriptedEngine) -> int:
    prompts = [r.prompt_text or "" for call in engine.calls for r in call]
    return sum("Solve the problem using your memory" in p for p in prompts)


def test_memory_mode_reports_per_length_and_resumes(eval_set: Path, tmp_path: Path, tok: Any,
                                                   tiny_model_dir: Path) -> None:
    out = tmp_path / "run"
    engine = ScriptedEngine(respond, tok)
    summary = run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, engine=engine, tokenizer=tok, batch_size=2)
    assert summary["order"] == ["4", "12"] and _final_requests(engine) == 6
    records = read_jsonl(out / EXAMPLES)
    assert len(records) == 6 and {r["group"] for r in records} == {"4", "12"}
    ids = [r["id"] for r in records if r["group"] == "4"]
    expected = sum(int(i[1:]) % 2 == 0 for i in ids) / 3
    for size in ("4", "12"):
        m = summary["groups"][size]["metrics"]
        assert m["strict_em"] == pytest.approx(expected) and m["em"] == pytest.approx(expected)
    rec = records[0]
    assert rec["memories"][1].startswith("note about item") and rec["gold"] == [f"value {rec['id'][1:]}"]
    assert set(rec["metrics"]) == set(METRICS) and rec["num_chunks"] >= 1
    saved = json.loads((out / SUMMARY).read_text())
    assert saved["average"]["em"] == pytest.approx(expected) and saved["main_metric"] == "sub_em"
    table = (out / TABLE).read_text()
    assert "| 12 | 3 |" in table and "**average**" in table
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = ScriptedEngine(respond, tok)  # everything done: nothing is generated again
    assert run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, engine=again, tokenizer=tok,
                           batch_size=2) == summary
    assert again.calls == []
    lines = (out / EXAMPLES).read_text().splitlines()
    (out / EXAMPLES).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # crash mid-line
    third = ScriptedEngine(respond, tok)  # the batch with the cut record runs again, as it ran before
    resumed = run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, engine=third, tokenizer=tok, batch_size=2)
    assert _final_requests(third) == 1
    assert resumed["groups"] == summary["groups"]

    with pytest.raises(ValueError, match=r"evaluation of something else.*protocol.chunk_tokens: 200 then"):
        run_longqa_eval(_cfg(tiny_model_dir, ["agent.chunk_tokens=300"]), eval_set, out, engine=third,
                        tokenizer=tok)


def test_limit_takes_the_same_questions_at_every_size(eval_set: Path, tmp_path: Path, tok: Any,
                                                      tiny_model_dir: Path) -> None:
    run_longqa_eval(_cfg(tiny_model_dir), eval_set, tmp_path / "r", limit=2,
                    engine=ScriptedEngine(respond, tok), tokenizer=tok)
    recs = read_jsonl(tmp_path / "r" / EXAMPLES)
    by_size = {g: [r["id"] for r in recs if r["group"] == g] for g in ("4", "12")}
    assert len(by_size["4"]) == 2 and by_size["4"] == by_size["12"]
    with pytest.raises(ValueError, match="--limit 0"):
        run_longqa_eval(_cfg(tiny_model_dir), eval_set, tmp_path / "r2", limit=0)


def test_full_context_mode_marks_too_long_instead_of_truncating(eval_set: Path, tmp_path: Path, tok: Any,
                                                                tiny_model_dir: Path) -> None:
    from memtrain.prompts import render

    engine = ScriptedEngine(respond, tok)
    # a context that fits every 4-paragraph prompt but no 12-paragraph one
    rows4 = read_jsonl_rows(eval_set / "docs_4")
    longest4 = max(len(render(tok, "full_context", None, problem=r["question"], chunk=r["context"])[1])
                   for r in rows4)
    summary = run_longqa_eval(_cfg(tiny_model_dir), eval_set, tmp_path / "fc", mode="full-context",
                              engine=engine, tokenizer=tok, max_context=longest4 + 16)
    assert summary["groups"]["4"]["metrics"]["strict_em"] == 1.0
    assert summary["groups"]["12"]["metrics"] is None and summary["groups"]["12"]["too_long"] == 3
    assert summary["average_over"] == ["4"]
    assert sum(len(c) for c in engine.calls) == 3  # too-long documents are never sent
    recs = [r for r in read_jsonl(tmp_path / "fc" / EXAMPLES) if r["group"] == "12"]
    assert all(r["status"] == "too_long" and r["prediction"] is None and "> context" in r["reason"]
               for r in recs)
    table = (tmp_path / "fc" / TABLE).read_text()
    assert "too long (3/3)" in table and "average (1/2)" in table


def read_jsonl_rows(d: Path) -> list[dict]:
    from memtrain.data.dataset import load_rows

    return load_rows(d)


def test_cli_with_the_tiny_model(eval_set: Path, tmp_path: Path, tiny_model_dir: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["eval", "longqa", "--model", str(tiny_model_dir), "--data", str(eval_set), "--out", str(out),
                 "--limit", "1", "agent.chunk_tokens=200", "agent.memory_tokens=8", "agent.answer_tokens=8",
                 "agent.max_chunks=2"]) == 0
    printed = capsys.readouterr().out
    assert "| 4 | 1 |" in printed and "| 12 | 1 |" in printed
    recs = read_jsonl(out / EXAMPLES)
    assert len(recs) == 2 and all(isinstance(r["prediction"], str) for r in recs)
    assert main(["eval", "longqa", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_smollm2_on_shared_hotpotqa(shared_data: Path, smollm2_dir: str, tmp_path: Path) -> None:
    """SmolLM2 end to end on two real HotpotQA questions at two lengths (tiny budgets: a smoke test)."""
    examples = read_hotpotqa(shared_data / "hotpotqa" / "dev.jsonl")
    data = tmp_path / "set"
    write_longqa(data, build_longqa(examples, [10, 20], 2, seed=0), {})
    cfg = load_config(None, ["model.name=smollm2-135m", "agent.chunk_tokens=1024", "agent.memory_tokens=16",
                             "agent.answer_tokens=12"])
    summary = run_longqa_eval(cfg, data, tmp_path / "run")
    assert [summary["groups"][g]["n"] for g in ("10", "20")] == [2, 2]
    recs = read_jsonl(tmp_path / "run" / EXAMPLES)
    assert all(len(r["memories"]) == r["num_chunks"] + 1 and r["num_doc_tokens"] > 0 for r in recs)
    assert all(0.0 <= summary["average"][m] <= 1.0 for m in ("strict_em", "em", "sub_em", "f1"))


# ------------------------------------------------------------------------------------------- protocol

def _prompts(engine: ScriptedEngine) -> list[str]:
    return [r.prompt_text or "" for call in engine.calls for r in call]


def _memory_prompts(engine: ScriptedEngine) -> list[str]:
    return [p for p in _prompts(engine) if parse("memory", p) is not None]


def test_memory_mode_reads_every_chunk_despite_agent_max_chunks(eval_set: Path, tmp_path: Path, tok: Any,
                                                                tiny_model_dir: Path) -> None:
    """agent.max_chunks (8 by default, a training budget) must not cut an evaluation document."""
    from memtrain.agent.chunking import chunk_document

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "agent.chunk_tokens=24", "agent.memory_tokens=8",
                             "agent.answer_tokens=16"])
    assert cfg.agent.max_chunks == 8
    data = tmp_path / "set12"
    write_longqa(data, build_longqa(_examples(), [12], 1, seed=0), {})
    engine = ScriptedEngine(respond, tok)
    run_longqa_eval(cfg, data, tmp_path / "all", engine=engine, tokenizer=tok)
    [rec] = read_jsonl(tmp_path / "all" / EXAMPLES)
    [row] = read_jsonl_rows(data / "docs_12")
    whole = chunk_document(row["context"], tok, 24, 10**6)
    assert len(whole.chunks) > 8 and not whole.truncated
    assert rec["num_chunks"] == len(whole.chunks) and rec["truncated"] is False
    assert len(rec["memories"]) == rec["num_chunks"] + 1
    read = _memory_prompts(engine)
    assert len(read) == len(whole.chunks)
    # the chunks were read in order, and together they are the whole document (gold paragraphs included)
    assert all(chunk in prompt for chunk, prompt in zip(whole.chunks, read, strict=True))
    paragraphs = re.findall(r"Paragraph \d+ of question \d+ says \d+\.", row["context"])
    assert len(paragraphs) == 12 and all(p in "".join(whole.chunks) for p in paragraphs)


def test_protocol_defaults_follow_memagent_and_are_recorded(eval_set: Path, tmp_path: Path, tok: Any,
                                                            tiny_model_dir: Path) -> None:
    engine = ScriptedEngine(respond, tok)
    out = tmp_path / "p"
    summary = run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, limit=1, engine=engine, tokenizer=tok)
    protocol = {"decoding": "sampled", "temperature": 0.7, "top_p": 0.95, "seed": 0, "samples": 1,
                "batch_size": 16, "chunk_tokens": 200, "memory_tokens": 32, "answer_tokens": 16,
                "max_chunks": None,
                "truncation": None, "reads": "every chunk",
                "compute_dtype": compute_dtype_name("auto")}
    assert summary["protocol"] == protocol and "warnings" not in summary
    assert json.loads((out / SUMMARY).read_text())["protocol"] == protocol
    assert json.loads((out / "eval.json").read_text())["protocol"] == protocol
    params = [r.params for call in engine.calls for r in call]
    assert all(p.temperature == 0.7 and p.top_p == 0.95 and p.seed is not None for p in params)
    table = (out / TABLE).read_text()
    assert "Protocol: decoding `sampled`, temperature `0.7`, top_p `0.95`, seed `0`" in table
    assert "max_chunks `none`" in table and "reads `every chunk`" in table and "WARNING" not in table

    # a resumed run cannot switch protocol
    with pytest.raises(ValueError, match=r"protocol.temperature: 0.7 then, 0.0 now"):
        run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, limit=1, temperature=0.0, engine=engine,
                        tokenizer=tok)
    greedy = ScriptedEngine(respond, tok)
    g = run_longqa_eval(_cfg(tiny_model_dir), eval_set, tmp_path / "g", limit=1, temperature=0.0,
                        engine=greedy, tokenizer=tok)
    assert g["protocol"]["decoding"] == "greedy" and g["protocol"]["temperature"] == 0.0
    assert all(r.params.greedy for call in greedy.calls for r in call)
    bad = (({"temperature": -1.0}, "--temperature -1.0"), ({"top_p": 0.0}, "--top-p 0.0"),
           ({"max_chunks": 0}, "--max-chunks 0"), ({"truncation": "head"}, "--truncation head"),
           ({"mode": "full-context", "max_chunks": 2}, "--mode memory only"))
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            run_longqa_eval(_cfg(tiny_model_dir), eval_set, tmp_path / "bad", **kwargs)  # type: ignore[arg-type]


def test_truncation_only_when_asked_and_then_loud(eval_set: Path, tmp_path: Path, tok: Any,
                                                  tiny_model_dir: Path) -> None:
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "agent.chunk_tokens=24", "agent.memory_tokens=8",
                             "agent.answer_tokens=16"])
    out = tmp_path / "t"
    engine = ScriptedEngine(respond, tok)
    summary = run_longqa_eval(cfg, eval_set, out, limit=2, max_chunks=3, truncation="head", engine=engine,
                              tokenizer=tok)
    recs = read_jsonl(out / EXAMPLES)
    assert all(r["num_chunks"] <= 3 for r in recs) and all(r["truncated"] for r in recs if r["group"] == "12")
    assert summary["protocol"]["max_chunks"] == 3 and summary["protocol"]["truncation"] == "head"
    assert summary["protocol"]["reads"] == "at most 3 chunks"
    cut = sum(r["truncated"] for r in recs)
    assert summary["groups"]["12"]["truncated"] == 1.0
    [warning] = summary["warnings"]
    assert warning.startswith(f"TRUNCATED EVALUATION: --max-chunks 3 (head) cut {cut}/4 documents")
    assert json.loads((out / SUMMARY).read_text())["warnings"] == [warning]
    table = (out / TABLE).read_text()
    assert f"> **WARNING: {warning}**" in table and table.index("WARNING") < table.index("| docs |")
    from memtrain.eval.report import compare_table

    assert f"**WARNING (trunc)**: {warning}" in compare_table([summary], ["trunc"])
    roomy = run_longqa_eval(cfg, eval_set, tmp_path / "roomy", limit=1, max_chunks=100,
                            engine=ScriptedEngine(respond, tok), tokenizer=tok)
    assert roomy["warnings"] == ["--max-chunks 100 (centre) asked for truncation, but no document needed "
                                 "more than 100 chunks (0/2 cut): every chunk was read"]


def _patch_engine(monkeypatch: pytest.MonkeyPatch, engines: list[ScriptedEngine]) -> None:
    """The CLI's own path, with a scripted engine instead of loading the model."""
    import memtrain.eval.longqa as longqa

    def load(cfg: Config, engine: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
        from memtrain.models import load_tokenizer

        tok = load_tokenizer(cfg.model.name)
        engines.append(ScriptedEngine(respond, tok))
        return engines[-1], tok

    monkeypatch.setattr(longqa, "load_engine", load)


def test_cli_decoding_and_truncation_flags(eval_set: Path, tmp_path: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    engines: list[ScriptedEngine] = []
    _patch_engine(monkeypatch, engines)
    base = ["eval", "longqa", "--model", str(tiny_model_dir), "--data", str(eval_set), "--limit", "1",
            "agent.chunk_tokens=24", "agent.memory_tokens=8", "agent.answer_tokens=16", "agent.max_chunks=2"]
    assert main([*base, "--out", str(tmp_path / "d")]) == 0
    summary = json.loads((tmp_path / "d" / SUMMARY).read_text())
    assert (summary["protocol"]["temperature"], summary["protocol"]["top_p"], summary["protocol"]["seed"],
            summary["protocol"]["max_chunks"]) == (0.7, 0.95, 0, None)
    assert max(r["num_chunks"] for r in read_jsonl(tmp_path / "d" / EXAMPLES)) > 2  # agent.max_chunks unused
    assert "warning" not in capsys.readouterr().err

    assert main([*base, "--out", str(tmp_path / "g"), "--greedy", "--seed", "5", "--max-chunks", "2",
                 "--truncation", "centre"]) == 0
    summary = json.loads((tmp_path / "g" / SUMMARY).read_text())
    assert summary["protocol"]["decoding"] == "greedy" and summary["protocol"]["seed"] == 5
    assert all(r.params.greedy for call in engines[-1].calls for r in call)
    captured = capsys.readouterr()
    assert "**WARNING: TRUNCATED EVALUATION" in captured.out
    assert "warning: TRUNCATED EVALUATION: --max-chunks 2 (centre)" in captured.err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "x"), "--greedy", "--temperature", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err


SHIPPED = ("longqa_smollm2_cpu.yaml", "longqa_qwen2.5_7b.yaml")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _paragraph(i: int, j: int) -> tuple[str, str]:
    """A synthetic paragraph of ~300 characters (real HotpotQA paragraphs average ~550)."""
    words = " ".join(f"fact{i}x{j}y{k}" for k in range(12))
    return (f"Title {i}-{j}", f"Paragraph {j} of question {i} says {i * 10 + j}. It also mentions {words}, "
            f"none of which answers anything about the value of item {i}, and it ends here.")


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_read_more_than_8_chunks_at_400_paragraphs(config: str, tmp_path: Path,
                                                                   tiny_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI with the shipped YAML (its agent.max_chunks is 4 / 8): the whole document is read."""
    examples = [HotpotExample(id=f"q{i}", question=f"What is the value of item {i}?", answer=f"value {i}",
                              paragraphs=tuple(_paragraph(i, j) for j in range(4)),
                              gold_titles=(f"Title {i}-0", f"Title {i}-1")) for i in range(110)]
    data = tmp_path / "set"
    write_longqa(data, build_longqa(examples, [400], 1, seed=0), {})
    engines: list[ScriptedEngine] = []
    _patch_engine(monkeypatch, engines)
    out = tmp_path / "run"
    assert main(["eval", "longqa", "--config", str(CONFIGS / config), "--model", str(tiny_model_dir),
                 "--data", str(data), "--out", str(out)]) == 0
    cfg = load_config(CONFIGS / config)
    [rec] = read_jsonl(out / EXAMPLES)
    assert rec["num_chunks"] > 8 and rec["num_chunks"] > cfg.agent.max_chunks and rec["truncated"] is False
    assert rec["num_chunks"] * cfg.agent.chunk_tokens >= rec["num_doc_tokens"]
    assert len(_memory_prompts(engines[0])) == rec["num_chunks"]


@pytest.mark.shared_data
@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_on_real_400_paragraph_documents(config: str, shared_data: Path,
                                                         smollm2_dir: str) -> None:
    """Real RULER-HotpotQA documents of 400 paragraphs (~60k SmolLM2 tokens; Qwen2.5's tokenizer counts
    about the same on English) need more than 8 chunks at both shipped budgets, and evaluation reads them
    all; the training budget (agent.max_chunks) would have kept 4 / 8 of them."""
    import argparse

    from memtrain.agent.loop import MemoryAgent
    from memtrain.cli.eval import build_config, register
    from memtrain.eval.longqa import eval_agent_config
    from memtrain.models import load_tokenizer

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "longqa", "--config", str(CONFIGS / config), "--data", "d",
                              "--out", "o"])
    cfg = build_config(args)
    tok = load_tokenizer(smollm2_dir)
    agent = MemoryAgent(engine=None, tokenizer=tok,  # type: ignore[arg-type]
                        config=eval_agent_config(cfg.agent, args.max_chunks, args.truncation))
    training = MemoryAgent(engine=None, tokenizer=tok, config=cfg.agent)  # type: ignore[arg-type]
    rows = build_longqa(read_hotpotqa(shared_data / "hotpotqa" / "dev.jsonl"), [400], 2, seed=0)[400]
    for row in rows:
        doc = agent.chunk(row)
        assert len(doc.chunks) > 8 and not doc.truncated
        assert doc.num_tokens > 8 * cfg.agent.chunk_tokens
        assert training.chunk(row).truncated and len(training.chunk(row).chunks) == cfg.agent.max_chunks


def test_a_set_without_context_fails_before_any_model_loads(tmp_path: Path) -> None:
    """A set without contexts used to die with KeyError 'context' after the model was loaded."""
    import pyarrow as pa

    from memtrain.data.dataset import DatasetError, write_dataset

    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string()))])
    write_dataset(tmp_path / "set", [{"id": "q0", "question": "Who?", "answers": ["x"]}], schema, "longqa",
                  info={"num_docs": 50})

    class NoEngine:
        def generate(self, requests):  # pragma: no cover - must never be reached
            raise AssertionError("the model was used")

    with pytest.raises(DatasetError, match=r"context"):
        run_longqa_eval(load_config(None, []), tmp_path / "set", tmp_path / "out", engine=NoEngine(),
                        tokenizer=object())
    assert not (tmp_path / "out").exists()  # nothing written either
