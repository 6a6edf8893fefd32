"""`memtrain eval longqa`: memory and full-context modes, per-length reports, resume."""

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
    if "Next section of the document" in prompt:
        return f"note about item {i}"
    if "Read the document below" in prompt:  # full-context template
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
    assert set(rec["metrics"]) == {"strict_em", "em", "sub_em", "f1"} and rec["num_chunks"] >= 1
    saved = json.loads((out / SUMMARY).read_text())
    assert saved["average"]["em"] == pytest.approx(expected) and saved["main_metric"] == "sub_em"
    table = (out / TABLE).read_text()
    assert "| 12 | 3 |" in table and "**average**" in table
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = ScriptedEngine(respond, tok)  # everything done: nothing is generated again
    assert run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, engine=again, tokenizer=tok) == summary
    assert again.calls == []
    lines = (out / EXAMPLES).read_text().splitlines()
    (out / EXAMPLES).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # crash mid-line
    third = ScriptedEngine(respond, tok)
    resumed = run_longqa_eval(_cfg(tiny_model_dir), eval_set, out, engine=third, tokenizer=tok)
    assert _final_requests(third) == 1
    assert resumed["groups"] == summary["groups"]

    with pytest.raises(ValueError, match=r"evaluation of something else.*agent"):
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
    cfg = load_config(None, ["model.name=smollm2-135m", "agent.chunk_tokens=256", "agent.memory_tokens=16",
                             "agent.answer_tokens=12", "agent.max_chunks=2"])
    summary = run_longqa_eval(cfg, data, tmp_path / "run")
    assert [summary["groups"][g]["n"] for g in ("10", "20")] == [2, 2]
    recs = read_jsonl(tmp_path / "run" / EXAMPLES)
    assert all(len(r["memories"]) == r["num_chunks"] + 1 and r["num_doc_tokens"] > 0 for r in recs)
    assert all(0.0 <= summary["average"][m] <= 1.0 for m in ("strict_em", "em", "sub_em", "f1"))
