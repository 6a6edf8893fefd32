"""Issue #15: an evaluation is one module that registers itself; ``memtrain eval NAME`` and the report's
default metric come from the registry, and building the parser stays light."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memtrain.cli.main import main
from memtrain.config import Config
from memtrain.errors import UserError
from memtrain.eval.registry import evaluations, get_eval, register_eval
from memtrain.eval.report import SUMMARY, TABLE, markdown_table, summarize
from memtrain.io import atomic_write_json, atomic_write_text, read_jsonl
from memtrain.scoring import score


def _toy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answer", required=True, help="what the toy model answers to every question")


@register_eval("toy", help="the toy model's answer against every row of a JSONL file", main_metric="f1",
               arguments=_toy_arguments, agent_budgets=False)
def toy_command(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    rows = read_jsonl(args.data)[: args.limit]
    records = [{"key": f"{r['set']}/{i}", "group": r["set"], "status": "ok",
                "metrics": score(args.answer, r["answers"])} for i, r in enumerate(rows)]
    summary = summarize(records, "toy", sorted({r["set"] for r in rows}), {"model": cfg.model.name})
    atomic_write_json(args.out / SUMMARY, summary)
    atomic_write_text(args.out / TABLE, markdown_table(summary))
    return summary


def test_a_registered_eval_is_a_command_and_reports_in_its_main_metric(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "toy.jsonl"
    rows = [{"set": "a", "answers": ["Paris"]}, {"set": "a", "answers": ["Paris France"]},
            {"set": "b", "answers": ["Rome"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["eval", "toy", "--data", str(data), "--out", str(out), "--answer", "Paris", "--limit", "2",
                 "model.name=toy-model"]) == 0
    printed = capsys.readouterr().out
    assert "# toy: toy-model" in printed and "`f1` the paper's headline metric" in printed
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    assert summary["main_metric"] == "f1" and summary["order"] == ["a"]  # --limit 2: set b not reached
    assert summary["groups"]["a"]["metrics"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.startswith("toy: `f1` in %")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "the toy model's answer against every row" in capsys.readouterr().out


def test_builtin_evals_are_discovered_with_their_main_metrics() -> None:
    metrics = {e.name: e.main_metric for e in evaluations()}
    assert {k: metrics[k] for k in ("longqa", "searchqa", "proxy")} == {
        "longqa": "sub_em", "searchqa": "em", "proxy": "strict_em"}
    assert get_eval("searchqa").agent_budgets is False
    with pytest.raises(UserError, match=r"no evaluation named 'nope' \(known: .*longqa"):
        get_eval("nope")


def test_registration_mistakes_are_refused() -> None:
    with pytest.raises(ValueError, match="'toy' is registered twice"):
        register_eval("toy", help="again", main_metric="em")(toy_command)
    with pytest.raises(ValueError, match="main_metric 'acc' is not one of strict_em"):
        register_eval("toy-acc", help="bad metric", main_metric="acc")(toy_command)
    assert "toy-acc" not in {e.name for e in evaluations()}


def test_building_the_parser_imports_no_heavy_library() -> None:
    """Every eval module is imported to build ``memtrain eval``: `memtrain --help` must stay fast."""
    code = ("import sys; from memtrain.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'pyarrow', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
