"""Eval reports: summaries, Markdown tables, plots, resume guards and `memtrain report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.cli.main import main
from memtrain.eval.report import (
    PLOT,
    SUMMARY,
    TABLE,
    check_resume,
    compare_table,
    done_keys,
    load_summary,
    markdown_table,
    summarize,
    write_report,
)
from memtrain.io import append_jsonl
from memtrain.scoring import METRICS


def _rec(group: str, i: int, em: float, status: str = "ok") -> dict:
    metrics = None if status == "too_long" else dict.fromkeys(METRICS, em)
    return {"key": f"{group}/{i}", "group": group, "status": status, "metrics": metrics,
            "num_doc_tokens": 100 * i}


def _longqa_summary(model: str, ems: dict[str, list[float]], too_long: tuple[str, ...] = ()) -> dict:
    recs = [_rec(g, i, em, "too_long" if g in too_long else "ok") for g, vals in ems.items()
            for i, em in enumerate(vals)]
    return summarize(recs, "longqa", list(ems), {"model": model, "mode": "memory"}, ("num_doc_tokens",))


def test_summary_means_and_average_over_groups() -> None:
    s = _longqa_summary("m", {"50": [1, 0, 1, 1], "100": [0, 0, 1, 0]})
    assert s["groups"]["50"]["metrics"]["em"] == 0.75 and s["groups"]["100"]["metrics"]["f1"] == 0.25
    assert s["average"]["em"] == 0.5 and s["average_over"] == ["50", "100"]
    assert s["groups"]["50"]["num_doc_tokens"] == 150.0
    assert s["reward_metric"] == "strict_em" and s["main_metric"] == "sub_em"
    table = markdown_table(s, ("num_doc_tokens",))
    assert "| 50 | 4 | 75.00 | 75.00 | 75.00 | 75.00 | 75.00 | 75.00 | 150 |" in table
    assert "| **average** |  | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |  |" in table


def test_too_long_groups_have_no_metrics() -> None:
    s = _longqa_summary("m", {"50": [1, 1], "6400": [0, 0]}, too_long=("6400",))
    assert s["groups"]["6400"]["metrics"] is None and s["groups"]["6400"]["too_long"] == 2
    assert s["average"]["em"] == 1.0 and s["average_over"] == ["50"]
    table = markdown_table(s)
    assert "| 6400 | 2 | too long (2/2) | too long | too long | too long | too long | too long |" in table
    assert "average (1/2)" in table
    empty = summarize([], "searchqa", ["nq"], {"model": "m"})
    assert empty["average"] is None and "| nq | 0 | - |" in markdown_table(empty)


def test_write_report_files(tmp_path: Path) -> None:
    write_report(tmp_path, _longqa_summary("m", {"50": [1, 0], "100": [0, 0], "200": [1, 1]}))
    assert json.loads((tmp_path / SUMMARY).read_text())["groups"]["200"]["metrics"]["em"] == 1.0
    assert (tmp_path / TABLE).read_text().startswith("# longqa: m (memory)")
    assert (tmp_path / PLOT).read_bytes()[:4] == b"\x89PNG"
    sq = summarize([_rec("nq", 0, 1.0), _rec("bamboogle", 0, 0.5)], "searchqa", ["nq", "bamboogle"],
                   {"model": "m"})
    write_report(tmp_path / "sq", sq)
    assert (tmp_path / "sq" / PLOT).stat().st_size > 1000


def test_resume_guards(tmp_path: Path) -> None:
    meta = {"task": "longqa", "model": "a", "limit": None}
    check_resume(tmp_path / "run", meta)
    check_resume(tmp_path / "run", meta)  # same evaluation: fine
    with pytest.raises(ValueError, match=r"model: 'a' then, 'b' now"):
        check_resume(tmp_path / "run", {**meta, "model": "b"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        check_resume(tmp_path / "other", meta)
    append_jsonl(tmp_path / "run" / "examples.jsonl", [{"key": "50/a"}, {"key": "50/b"}])
    with (tmp_path / "run" / "examples.jsonl").open("a") as fh:
        fh.write('{"key": "50/c", "trunc')
    assert done_keys(tmp_path / "run") == {"50/a", "50/b"}
    append_jsonl(tmp_path / "run" / "examples.jsonl", [{"key": "50/c"}])  # appended after the repair
    assert done_keys(tmp_path / "run") == {"50/a", "50/b", "50/c"}


def test_compare_table_side_by_side() -> None:
    base = _longqa_summary("base", {"50": [0, 0], "100": [0, 1]})
    tuned = _longqa_summary("tuned", {"50": [1, 1], "100": [1, 0], "200": [1, 1]})
    table = compare_table([base, tuned], ["base", "tuned"], "em")
    lines = table.splitlines()
    assert lines[2] == "| model | 50 | 100 | 200 | average |"
    assert "| base | 0.00 | 50.00 |  | 25.00* |" in lines
    assert "| tuned | 100.00 | 50.00 | 100.00 | 83.33 |" in lines
    assert "`sub_em`" in compare_table([base], ["b"])  # the task's headline metric by default
    sq = summarize([_rec("nq", 0, 1.0)], "searchqa", ["nq"], {"model": "m"})
    with pytest.raises(ValueError, match="different tasks"):
        compare_table([base, sq], ["a", "b"])
    with pytest.raises(ValueError, match="--metric 'acc'"):
        compare_table([base], ["a"], "acc")


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, ems in (("a", [0, 1]), ("b", [1, 1])):
        write_report(tmp_path / name, _longqa_summary(name, {"50": ems}))
    out = tmp_path / "table.md"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "f1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| a | 50.00 | 50.00 |" in printed and "| b | 100.00 | 100.00 |" in printed
    assert out.read_text() == printed
    assert main(["report", str(tmp_path / "a"), "--labels", "x,y"]) == 1
    assert "2 labels for 1 runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no summary.json" in capsys.readouterr().err
    assert load_summary(tmp_path / "a" / SUMMARY)["model"] == "a"
