"""Multi-objective search-QA tasks: reading QA files, pairing, writing, `memtrain data searchqa`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.cli.main import main
from memtrain.data.dataset import load_rows
from memtrain.data.searchqa import (
    build_searchqa,
    build_tasks,
    eval_sets,
    join_questions,
    read_qa,
    to_row,
    write_searchqa,
)


def _qa_file(path: Path, n: int, prefix: str = "q") -> Path:
    recs = [{"question": f"{prefix} question {i}?",
             "answer": [f"{prefix}{i}", f"alt {i}"] if i % 2 else f"{prefix}{i}"} for i in range(n)]
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def test_read_qa_layouts_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = read_qa(_qa_file(tmp_path / "nq.json", 4))
    assert [i.answers for i in items[:2]] == [("q0",), ("q1", "alt 1")]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"question": "a?", "golden_answers": ["b"]}\n\n{"question": "c?", "answers": "d"}\n')
    assert [(i.question, i.answers) for i in read_qa(jsonl)] == [("a?", ("b",)), ("c?", ("d",))]
    sep = tmp_path / "sep.json"
    recs = [{"question": "a?", "answer": "x; y"}, {"question": "b?", "answer": ["p; q", "r"]},
            {"question": "c?", "answer": "z"}]
    sep.write_text(json.dumps(recs))
    items = read_qa(sep)  # an answer containing ';' can never be matched after the split
    assert [(i.question, i.answers, i.index) for i in items] == [("b?", ("r",), 1), ("c?", ("z",), 2)]
    assert "skipped 1 question" in caplog.text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "a?", "answer": "b"}, {"question": "", "answer": "c"}]))
    with pytest.raises(ValueError, match=r"bad.json: record 1: field 'question'"):
        read_qa(bad)
    bad.write_text(json.dumps([{"question": "a?", "answer": []}]))
    with pytest.raises(ValueError, match="field 'answer'"):
        read_qa(bad)
    with pytest.raises(FileNotFoundError):
        read_qa(tmp_path / "none.json")


def test_tasks_pair_distinct_questions_deterministically(tmp_path: Path) -> None:
    items = read_qa(_qa_file(tmp_path / "hotpotqa.json", 11))
    tasks = build_tasks(items, "hotpotqa", objectives=2, seed=5)
    assert len(tasks) == 5  # 11 // 2, each question at most once
    used = [q for t in tasks for q in t["questions"]]
    assert len(set(used)) == len(used) == 10
    assert tasks == build_tasks(items, "hotpotqa", 2, seed=5)
    assert tasks != build_tasks(items, "hotpotqa", 2, seed=6)
    t = tasks[0]
    assert t["question"] == join_questions(t["questions"]) and t["question"].startswith("Question 1: ")
    assert len(t["answers"]) == 2 and t["objectives"] == 2 and t["dataset"] == "hotpotqa"
    for q, golds in zip(t["questions"], t["answers"], strict=True):
        i = int(q.split()[2].rstrip("?"))
        assert golds[0] == f"q{i}"
    assert build_tasks(items, "h", 3, seed=0, num_tasks=2)[1]["objectives"] == 3
    with pytest.raises(ValueError, match="need 12 questions; the file has 11"):
        build_tasks(items, "h", 2, seed=0, num_tasks=6)
    assert join_questions(["only?"]) == "only?"


def test_rows_keep_per_objective_golds(tmp_path: Path) -> None:
    items = read_qa(_qa_file(tmp_path / "nq.json", 4))
    row = to_row(build_tasks(items, "nq", 2, seed=0)[0])
    assert len(row["objective_answers"]) == 2
    assert row["answers"] == ["; ".join(g[0] for g in row["objective_answers"])]
    single = to_row(build_tasks(items, "nq", 1, seed=0)[0])
    assert single["answers"] == single["objective_answers"][0]


def test_write_eval_and_train_sets(tmp_path: Path) -> None:
    files = [_qa_file(tmp_path / "nq.json", 6, "n"), _qa_file(tmp_path / "bamboogle.json", 4, "b")]
    tasks = build_searchqa(files, 2, seed=0)
    assert {k: len(v) for k, v in tasks.items()} == {"nq": 3, "bamboogle": 2}
    out = tmp_path / "eval"
    write_searchqa(out, tasks, {})
    sets = dict(eval_sets(out))
    assert set(sets) == {"nq", "bamboogle"}
    rows = load_rows(sets["nq"])
    assert [r["objective_answers"] for r in rows] == [t["answers"] for t in tasks["nq"]]
    train = tmp_path / "train"
    manifest = write_searchqa(train, tasks, {}, train=True, seed=0)
    assert manifest["num_rows"] == 5 and manifest["datasets"] == {"nq": 3, "bamboogle": 2}
    assert {r["dataset"] for r in load_rows(train)} == {"nq", "bamboogle"}
    with pytest.raises(ValueError, match="two files named 'nq'"):
        build_searchqa([files[0], files[0]], 2, seed=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = _qa_file(tmp_path / "musique.json", 8)
    out = tmp_path / "sq"
    assert main(["data", "searchqa", "--qa", str(f), "--objectives", "2", "--num-tasks", "3",
                 "--out", str(out)]) == 0
    assert "musique 3" in capsys.readouterr().out
    assert len(load_rows(out / "musique")) == 3
    assert main(["data", "searchqa", "--qa", str(f), "--num-tasks", "9", "--out", str(tmp_path / "x")]) == 1
    assert "need 18 questions" in capsys.readouterr().err


def test_shared_qa_eval_files_build(shared_data: Path) -> None:
    files = sorted((shared_data / "qa-eval").glob("*.json"))
    tasks = build_searchqa(files, 2, seed=42, num_tasks=10)
    assert set(tasks) == {"nq", "hotpotqa", "2wikimultihop", "musique", "bamboogle"}
    assert all(len(v) == 10 and all(len(t["answers"]) == 2 for t in v) for v in tasks.values())
