"""`train.task: searchqa` through the real trainer: tiny model, real BM25 retriever, one GRPO step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.config import load_config
from memtrain.data.searchqa import build_searchqa, write_searchqa
from memtrain.io import read_jsonl
from memtrain.rl.trainer import train

SHORT = {"search": "Q: {problem}\nM: {memory}\nR: {chunk}\nReply:",
         "search_last": "Q: {problem}\nM: {memory}\nR: {chunk}\nAnswer:"}


def test_one_searchqa_training_step(tiny_model_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": str(i), "contents": f'"{c}"\n{c} is a capital city.'})
                                for i, c in enumerate(["Paris", "Berlin", "Rome", "Madrid"])) + "\n")
    qa = tmp_path / "nq.json"
    qa.write_text(json.dumps([{"question": f"capital {i}?", "answer": c}
                              for i, c in enumerate(["Paris", "Berlin", "Rome", "Madrid"])]))
    data = tmp_path / "train"
    write_searchqa(data, build_searchqa([qa], 2, seed=0), {}, train=True)
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.path={data}", "train.task=searchqa",
        f"search.retriever={corpus}", "search.max_turns=2", "search.response_tokens=8",
        "search.results_tokens=16", "rl.group_size=2",
        "rl.micro_batch_tokens=4096", "train.batch_size=2", "train.steps=1", "train.checkpoint_every=1",
        "train.sample_every=1", "train.threads=2", f"agent.templates={json.dumps(SHORT)}",
    ])
    run = tmp_path / "run"
    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))  # where the corpus's BM25 index is cached
    train(cfg, run)
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert "search_reward" in row and row["search_episodes"] == 4.0  # 2 rows x G=2
    assert row["search_turns"] >= 4.0 and row["len_search"] > 0  # total model turns of the step
    assert 1.0 <= row["search_turns_per_episode"] <= 2.0
    assert row["search_malformed"] == 4.0 * row["search_malformed_rate"]
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and all(s["kind"] == "search" and s["outcome"] in ("answer", "malformed", "no_answer")
                           for s in samples)
