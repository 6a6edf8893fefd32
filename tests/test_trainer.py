"""The GRPO loop: grouping/filtering/broadcast, data order, exact resume, non-finite steps, batch refill."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memtrain.config import ConfigError, load_config
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.io import read_jsonl
from memtrain.models import load_tokenizer
from memtrain.rl.collect import batch_indices, refill_rows, unique_ids
from memtrain.rl.rollout import score_groups, step_metrics, training_sequences
from memtrain.rl.tasks.proxy import ProxyTask
from memtrain.rl.tasks.registry import TASKS
from memtrain.rl.trainer import NonFiniteError, train
from train_helpers import (
    ParityTask,
    poison_updates,
    scripted_responder,
    scripted_rows,
    tiny_config,
    write_proxy_dataset,
)

TIMING = ("time_rollout_s", "time_update_s", "time_sync_s", "step_time_s")


def test_groups_filter_and_advantage_broadcast(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    config = load_config(
        None,
        [
            "agent.chunk_tokens=12",
            "agent.max_chunks=4",
            "agent.memory_tokens=16",
            "agent.answer_tokens=16",
            "rl.group_size=2",
            "rl.imr_group_size=2",
        ],
    )
    rollouts, counters = ProxyTask(config, tok).rollout(
        scripted_rows(), ScriptedEngine(scripted_responder, tok), SamplingParams(), 2, random.Random(0)
    )
    # rewards: A/e2e [1.25, 0.25], B/e2e [0, 0] (uniform), A/0/imr [1, 0], A/1/imr [1, 0]
    scored = score_groups(rollouts, std_norm=False, dynamic_filter=True)
    assert scored.groups == {"A/e2e": True, "B/e2e": False, "A/0/imr": True, "A/1/imr": True}
    by_group = {}
    for r, adv in zip(scored.rollouts, scored.advantages, strict=True):
        by_group.setdefault(r.group, []).append(adv)
    assert by_group["A/e2e"] == pytest.approx([0.5, -0.5])  # Dr. GRPO: R - mean, no std division
    assert by_group["A/0/imr"] == pytest.approx([0.5, -0.5])
    seqs = training_sequences(scored)
    e2e_turns = [t for r in rollouts if r.group == "A/e2e" for t in r.turns]
    assert len(seqs) == len(e2e_turns) + 4  # B filtered away; every turn of A's trajectories + 4 IMR answers
    first = rollouts[0]
    assert [s.advantage for s in seqs[: len(first.turns)]] == pytest.approx([0.5] * len(first.turns))
    assert [s.kind for s in seqs[: len(first.turns)]] == [t.kind for t in first.turns]
    assert seqs[0].prompt_ids == first.turns[0].prompt_ids and seqs[0].old_logprobs == first.turns[0].logprobs
    assert {s.group for s in seqs} == {"A/e2e", "A/0/imr", "A/1/imr"}
    # one session per kept rollout (rl.loss_agg=session_mean): a trajectory's turns share it, IMR samples
    # each have their own
    kept = [r for r, k in zip(scored.rollouts, scored.kept, strict=True) if k]
    sessions = [s.session for s in seqs]
    assert len(set(sessions)) == len(kept) and None not in sessions
    assert set(sessions[: len(first.turns)]) == {sessions[0]} and sessions[len(first.turns)] != sessions[0]

    m = step_metrics(scored, counters)
    assert m["groups"] == 4 and m["filtered_groups"] == 1
    assert m["e2e_reward"] == pytest.approx((1.25 + 0.25) / 4) and m["imr_match"] == 0.5
    assert m["e2e_match"] == 0.25 and m["imr_none"] == 2
    e2e = sorted(r.reward for r in scored.rollouts if r.primary)
    assert e2e == pytest.approx([0.0, 0.0, 0.25, 1.25])  # the spread the reward plot shades: population std
    assert m["e2e_reward_std"] == pytest.approx(math.sqrt(sum((x - 0.375) ** 2 for x in e2e) / 4))
    assert m["tokens_generated"] == sum(len(t.completion_ids) for r in rollouts for t in r.turns)

    std = score_groups(rollouts, std_norm=True, dynamic_filter=False)
    assert all(std.kept) and [
        a for r, a in zip(std.rollouts, std.advantages, strict=True) if r.group == "B/e2e"
    ] == [0.0, 0.0]


def test_data_order_is_seeded_per_epoch_and_resumable() -> None:
    stream = batch_indices(5, seed=7, shuffle=True, position=0, count=15)
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))  # every row once per epoch
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]  # reshuffled per epoch
    assert batch_indices(5, 7, True, 6, 4) == stream[6:10]  # any position recomputes the same rows
    assert batch_indices(5, 8, True, 0, 5) != stream[:5]
    assert batch_indices(4, 7, False, 2, 4) == [2, 3, 0, 1]
    seen: dict[str, int] = {}
    rows = unique_ids([{"id": "a"}, {"id": "b"}], seen) + unique_ids([{"id": "a"}], seen)
    assert [r["id"] for r in rows] == ["a", "b", "a@2"]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def test_resume_continues_exactly(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(TASKS, "longqa", ParityTask)
    data = write_proxy_dataset(tmp_path / "data")
    over = ["train.task=longqa", "rl.group_size=3", "optim.lr=1e-2", "train.keep_last=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=4"]), straight)
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=2"]), resumed)
    assert not (resumed / "checkpoints" / "step_000003").exists()
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=4"]), resumed, resume=True)

    a, b = _weights(straight, 4), _weights(resumed, 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-3  # it really trained
    rows_a, rows_b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert any(r["grad_norm"] and r["grad_norm"] > 0 for r in rows_a)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {
            k: v for k, v in rb.items() if k not in TIMING
        }
    # keep_last=3: steps 2..4 remain, 1 was pruned; samples.jsonl holds each step once
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step_*")) == [
        "step_000002",
        "step_000003",
        "step_000004",
    ]
    assert [r["step"] for r in read_jsonl(resumed / "samples.jsonl")] == [
        s for s in (1, 2, 3, 4) for _ in range(4)
    ]
    # a finished run resumed again does nothing
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=4"]), resumed, resume=True)
    assert len(read_jsonl(resumed / "metrics.jsonl")) == 4


def test_nonfinite_steps_are_skipped_then_stop_the_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    poison_updates(monkeypatch, lambda n: n >= 2)
    config = tiny_config(tiny_model_dir, data, ["rl.dynamic_filter=false", "train.steps=6"])
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(up to step 4\).*step_000001"):
        train(config, run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert rows[1]["loss"] is None  # NaN is written as null
    assert os.readlink(run / "checkpoints" / "latest") == "step_000001"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    # the skipped steps did not touch the weights: the checkpoint is the model after step 1, and resuming
    # (with the poison gone) continues from it and redoes steps 2..3
    monkeypatch.undo()
    train(tiny_config(tiny_model_dir, data, ["rl.dynamic_filter=false", "train.steps=3"]), run, resume=True)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["skipped_nonfinite"]) for r in rows] == [(1, 0.0), (2, 0.0), (3, 0.0)]


def test_training_refuses_top_p_below_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The update scores softmax(logits / T), not a top-p nucleus: refused before anything is loaded."""
    config = tiny_config(tiny_model_dir, tmp_path / "data", ["rl.top_p=0.9"])
    with pytest.raises(ConfigError, match=r"^rl\.top_p=0\.9: training needs rl\.top_p=1\.0"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fill_filtered_batches_rolls_out_more_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    # a random model never boxes the right entity: every group is uniform (all 0) and filtered
    data = write_proxy_dataset(tmp_path / "data")
    config = tiny_config(
        tiny_model_dir,
        data,
        [
            "rl.fill_filtered_batches=true",
            "train.fill_max_rounds=2",
            "train.steps=1",
            "train.tensorboard=false",
        ],
    )
    train(config, tmp_path / "run")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["rollout_rounds"] == 2 and row["samples"] == 4 and row["data_position"] == 4
    assert row["filtered_groups"] == row["groups"] > 0
    assert row["skipped_empty"] == 1.0 and row["num_seqs"] == 0.0
    assert row["documents"] == 4  # counters summed over both rounds


def test_fill_min_groups_counts_groups_of_any_kind(tiny_model_dir: Path, tmp_path: Path) -> None:
    """rl.fill_min_groups: the refill target is kept groups of any kind; with every group filtered each extra
    round rolls out a whole batch again, up to train.fill_max_rounds."""
    data = write_proxy_dataset(tmp_path / "data")
    over = ["rl.fill_filtered_batches=true", "rl.fill_min_groups=3", "train.fill_max_rounds=3",
            "train.steps=1", "train.tensorboard=false"]
    train(tiny_config(tiny_model_dir, data, over), tmp_path / "run")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["rollout_rounds"] == 3 and row["samples"] == 6 and row["kept_groups"] == 0


@pytest.mark.parametrize(
    ("kept", "target", "rows_so_far", "rows_count_groups", "expected"),
    [
        (3, 3, 4, False, 0),  # target reached: no more rows
        (0, 3, 4, False, 2),  # nothing kept yet: a whole batch (batch_size 2)
        (1, 3, 4, False, 2),  # 1 group per 4 rows: 8 rows would be needed, capped at a batch
        (6, 8, 4, False, 2),  # 1.5 groups per row: 2 missing -> ceil(2 / 1.5) = 2 rows
        (7, 8, 4, False, 1),  # 1 missing at 1.75 groups per row: one row
        (1, 2, 2, True, 1),  # DAPO: rows are groups - exactly the missing rows
    ],
)
def test_refill_rows(kept: int, target: int, rows_so_far: int, rows_count_groups: bool,
                     expected: int) -> None:
    assert refill_rows(kept, target, rows_so_far, 2, rows_count_groups) == expected


def test_exploding_updates_are_undone_and_never_saved(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A learning rate no optimizer could use is refused in one line; an update that stays finite but moves
    the weights by more than optim.max_update_ratio of their norm is undone and counted like a non-finite
    step, the run stops after train.max_nonfinite of them, and no checkpoint holds exploded weights."""
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be less than or equal to 1"):
        tiny_config(tiny_model_dir, data, ["optim.lr=1e30"])
    config = tiny_config(tiny_model_dir, data, ["rl.dynamic_filter=false", "optim.lr=0.5", "train.steps=5",
                                                "optim.warmup_steps=0", "optim.max_update_ratio=0.01",
                                                "optim.weight_decay=0.1"])  # a step moves >= lr * wd
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(up to step 3\).*none yet"):
        train(config, run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["skipped_nonfinite"], r["skipped_exploded"], r["nonfinite_params"]) for r in rows] == [
        (1.0, 1.0, 0.0)] * 3
    assert all(r["update_ratio"] > 0.01 for r in rows)
    assert not list((run / "checkpoints").glob("step_*"))
    # the default threshold lets the same lr pass: the steps were refused for their size, not their lr
    fine = tiny_config(tiny_model_dir, data, ["rl.dynamic_filter=false", "optim.lr=1e-3", "train.steps=1"])
    train(fine, tmp_path / "run2")
    row = read_jsonl(tmp_path / "run2" / "metrics.jsonl")[0]
    assert row["skipped_exploded"] == 0.0 and 0 < row["update_ratio"] < fine.optim.max_update_ratio


def test_failed_start_writes_nothing_and_the_same_command_then_runs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Bad data or a bad model fail before config.yaml is written, so the rerun is not refused as a run."""
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train(tiny_config(tiny_model_dir, tmp_path / "nope"), run)
    assert not run.exists()
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model_dir / f).is_file():
            (empty_model / f).write_bytes((tiny_model_dir / f).read_bytes())
    with pytest.raises(ValueError, match=r"no config\.json"):  # tokenizer fine, weights missing
        train(tiny_config(empty_model, data, ["train.steps=1"]), run)
    assert not (run / "config.yaml").exists() and [p.name for p in run.iterdir()] == [".lock"]
    train(tiny_config(tiny_model_dir, data, ["train.steps=1", "train.tensorboard=false"]), run)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
