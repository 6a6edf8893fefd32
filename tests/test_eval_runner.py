"""The shared eval runner: a benchmark written in one file (tests/eval_plugin.py, under 60 lines) becomes
``memtrain eval closedbook``, resumes where a killed run stopped with the records an uninterrupted run writes,
and reports through ``memtrain report`` in its registered main metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_plugin
import memtrain.eval.runner as runner_mod
from memtrain.cli.main import main
from memtrain.config import load_config
from memtrain.errors import UserError
from memtrain.eval.proxy import run_proxy_eval
from memtrain.eval.report import EXAMPLES, SUMMARY
from memtrain.io import read_jsonl
from memtrain.rl.trainer import find_validator


def test_a_new_benchmark_file_is_small() -> None:
    assert len(Path(eval_plugin.__file__).read_text().splitlines()) < 60


def test_a_plugin_eval_resumes_and_reports(tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [{"id": f"q{i}", "set": "ab"[i % 2], "question": f"What is item {i}?", "answers": [f"item {i}"]}
            for i in range(7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = ["eval", "closedbook", "--data", str(data), "--batch-size", "2", f"model.name={tiny_model_dir}",
            "engine.kind=hf", "model.dtype=float32", "agent.answer_tokens=4"]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0

    real, calls = runner_mod.append_jsonl, []

    def die_after_first_batch(path: Path, records: list) -> None:
        calls.append(len(records))
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a killed process: the first batch is saved, nothing after it
        real(path, records)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(runner_mod, "append_jsonl", die_after_first_batch)
        assert main([*args, "--out", str(resumed)]) == 130
    assert len(read_jsonl(resumed / EXAMPLES)) == 2
    batches = []
    monkeypatch.setattr(runner_mod, "append_jsonl", lambda path, records: (batches.append(len(records)),
                                                                          real(path, records)))
    assert main([*args, "--out", str(resumed)]) == 0
    assert batches == [2, 2, 1]  # set a: 4 rows (its first batch saved), then set b: 3 rows, batches of 2
    by_key = {r["key"]: r for r in read_jsonl(full / EXAMPLES)}
    assert {r["key"]: r for r in read_jsonl(resumed / EXAMPLES)} == by_key and len(by_key) == 7
    summary = json.loads((resumed / SUMMARY).read_text())
    assert summary == json.loads((full / SUMMARY).read_text())
    assert summary["main_metric"] == "em" and summary["order"] == ["a", "b"]
    capsys.readouterr()
    assert main(["report", str(resumed)]) == 0
    assert capsys.readouterr().out.startswith("closedbook: `em` in %")


def test_train_eval_names_the_validating_evaluation() -> None:
    def validator(*overrides: str) -> object:
        return find_validator(load_config(None, ["train.eval_data=held-out", *overrides]))

    assert validator() is run_proxy_eval  # by default the evaluation named like train.task
    assert validator("train.task=longqa", "train.eval=proxy") is run_proxy_eval
    with pytest.raises(UserError, match="'closedbook' evaluation cannot validate during training"):
        validator("train.eval=closedbook")
    with pytest.raises(UserError, match="no evaluation named 'nope'"):
        validator("train.eval=nope")
    assert find_validator(load_config(None, ["train.eval=nope"])) is None  # no train.eval_data: no validation


def test_memtrain_plugins_adds_a_benchmark_to_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "MEMTRAIN_PLUGINS": str(Path(eval_plugin.__file__))}
    help_cmd = [sys.executable, "-m", "memtrain", "eval", "--help"]
    proc = subprocess.run(help_cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0 and "closedbook" in proc.stdout, proc.stderr[-2000:]
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('half-written plug-in')\n")
    proc = subprocess.run(help_cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**env, "MEMTRAIN_PLUGINS": f"{bad}, json"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"memtrain: error: MEMTRAIN_PLUGINS: cannot import '{bad}': RuntimeError: half-written plug-in"]
