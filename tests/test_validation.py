"""Validation during training (``train.eval_data``): the policy evaluated on a held-out set as it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.config import load_config
from memtrain.errors import UserError
from memtrain.eval.proxy import run_proxy_eval
from memtrain.io import read_jsonl
from memtrain.rl.metrics import (
    plot_run,
    read_metrics,
    validation_dirs,
    validation_points,
    validation_table,
)
from memtrain.rl.tasks.proxy import ProxyTask
from memtrain.rl.tasks.registry import TASKS
from memtrain.rl.trainer import train, validation_due
from train_helpers import tiny_config, write_proxy_dataset

TIMING = ("time_rollout_s", "time_update_s", "time_sync_s", "step_time_s")


class OddTokensTask(ProxyTask):
    """The proxy task rewarded by the share of odd token ids in each final/IMR answer: rewards that differ
    between a random-weight model's samples, so every step updates and the greedy outputs soon change."""

    def rollout(self, samples, engine, params, group_size, rng):  # type: ignore[no-untyped-def]
        rollouts, counters = super().rollout(samples, engine, params, group_size, rng)
        for r in rollouts:
            ids = r.turns[-1].completion_ids
            r.reward = sum(i % 2 for i in ids) / max(len(ids), 1)
        return rollouts, counters


def _records(eval_dir: Path) -> list[dict]:
    """What a model answered, per document (the run directory's bookkeeping aside)."""
    rows = read_jsonl(eval_dir / "examples.jsonl")
    return [{k: r[k] for k in ("id", "e2e", "imr", "memories")} for r in rows]


def test_validation_due_before_every_n_and_after_the_last() -> None:
    cfg = load_config(None, ["train.steps=7", "train.eval_data=somewhere", "train.eval_every=3"]).train
    assert [s for s in range(8) if validation_due(cfg, s)] == [0, 3, 6, 7]
    cfg.eval_every = 0
    assert [s for s in range(8) if validation_due(cfg, s)] == [0, 7]
    cfg.eval_data = ""
    assert not any(validation_due(cfg, s) for s in range(8))


def test_validation_evaluates_the_policy_as_it_trains(tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 0 is the base model and step 2 the trained checkpoint, each exactly as `memtrain eval proxy`
    evaluates them; validating does not change what the run learns."""
    monkeypatch.setitem(TASKS, "proxy", OddTokensTask)
    data = write_proxy_dataset(tmp_path / "data")
    heldout = write_proxy_dataset(tmp_path / "heldout", 6)
    # float32 weights: as trained (a standalone eval of model.dtype=auto loads bf16 weights, not autocast)
    over = ["model.dtype=float32", "agent.answer_tokens=16", "optim.lr=1e-2", "train.steps=2",
            "train.tensorboard=false"]
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    train(tiny_config(tiny_model_dir, data, over), plain)
    # (the toy articles are few: the "held-out" set repeats them, allowed here, refused by default)
    cfg = tiny_config(tiny_model_dir, data, [*over, f"train.eval_data={heldout}", "train.eval_every=1",
                                              "train.eval_batch_size=4", "train.allow_eval_overlap=true"])
    train(cfg, validated)

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(validated)) == strip(read_metrics(plain))
    assert all(r["grad_norm"] > 0 for r in read_metrics(plain))  # both steps updated the policy
    assert list(validation_dirs(validated)) == [0, 1, 2]

    for step, model in ((0, tiny_model_dir), (2, validated / "checkpoints" / "step_000002")):
        alone = tmp_path / f"alone-{step}"
        run_proxy_eval(tiny_config(model, data, over), heldout, alone, batch_size=4)
        assert _records(validated / "eval" / f"step_{step:06d}") == _records(alone)
    # the weights moved, and the validation saw it: the memories written changed between step 0 and 2
    assert _records(validated / "eval" / "step_000000") != _records(validated / "eval" / "step_000002")
    meta = json.loads((validated / "eval" / "step_000002" / "eval.json").read_text())
    assert meta["model_id"]["step"] == 2 and meta["model_id"]["run"] == str(validated.resolve())

    table = validation_table(validated, read_metrics(validated))
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["0", "1", "2"]
    assert "imr strict_em" in table.splitlines()[0]  # the run's reward metric (the config's default)
    paths = plot_run(validated)
    assert (validated / "plots" / "validation.png") in paths


def test_resume_keeps_done_validations_and_moves_a_killed_runs_later_ones(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    heldout = write_proxy_dataset(tmp_path / "heldout", 4)
    run = tmp_path / "run"
    over = [f"train.eval_data={heldout}", "train.tensorboard=false", "train.eval_every=1",
            "train.allow_eval_overlap=true"]  # the toy set repeats the training articles
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=1"]), run)
    assert list(validation_dirs(run)) == [0, 1]
    first = (run / "eval" / "step_000001" / "examples.jsonl").read_text()
    stale = run / "eval" / "step_000002"  # as a run killed after validating step 2 but before its checkpoint
    stale.mkdir()
    (stale / "examples.jsonl").write_text('{"key": "doc0", "stale": true}\n')

    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=2"]), run, resume=True)
    assert list(validation_dirs(run)) == [0, 1, 2]
    moved = run / "eval" / "dropped" / "step_000002" / "examples.jsonl"
    assert moved.read_text().startswith('{"key": "doc0", "stale"')
    assert "stale" not in (run / "eval" / "step_000002" / "examples.jsonl").read_text()
    assert (run / "eval" / "step_000001" / "examples.jsonl").read_text() == first  # not evaluated again


def test_bad_validation_settings_fail_before_anything_is_written(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="nope"):
        train(tiny_config(tiny_model_dir, data, [f"train.eval_data={tmp_path / 'nope'}"]), run)
    assert not (run / "config.yaml").exists()
    with pytest.raises(UserError, match=r"train.eval_data=.*'longqa' evaluation cannot validate"):
        train(tiny_config(tiny_model_dir, data, ["train.task=longqa", f"train.eval_data={data}"]), run)
    assert not (run / "config.yaml").exists()


def test_validation_points_read_any_evaluation_summary() -> None:
    proxy = {"order": ["e2e", "imr"],
             "groups": {"e2e": {"metrics": {"f1": 0.1}}, "imr": {"metrics": {"f1": 0.3}}},
             "e2e": {"metrics": {"f1": {"mean": 0.1, "lo": 0.0, "hi": 0.2, "n": 4}}, "in_memory": None},
             "imr": {"metrics": {"f1": {"mean": 0.3, "lo": 0.1, "hi": 0.5, "n": 4}},
                     "in_memory": {"mean": 0.5, "lo": 0.25, "hi": 0.75, "n": 4}}}
    assert validation_points(proxy, "f1") == {
        "e2e f1": {"mean": 0.1, "lo": 0.0, "hi": 0.2}, "imr f1": {"mean": 0.3, "lo": 0.1, "hi": 0.5},
        "imr label in memory": {"mean": 0.5, "lo": 0.25, "hi": 0.75}}
    longqa = {"order": ["10"], "groups": {"10": {"metrics": {"em": 0.25}}}}  # means only, no intervals
    assert validation_points(longqa, "em") == {"10 em": {"mean": 0.25, "lo": None, "hi": None}}
