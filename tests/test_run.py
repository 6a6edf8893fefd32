"""A run in pieces: ``setup_run`` alone (fresh, resumed, finished), one ``train_step``, the lock, and the
engine kept in step with the policy (synced before the first step and after every real update)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memtrain.engines.hf import HFEngine
from memtrain.io import read_jsonl
from memtrain.rl.trainer import close_run, setup_run, train, train_step
from train_helpers import tiny_config, write_proxy_dataset

QUIET = ["train.tensorboard=false", "rl.dynamic_filter=false"]


def _lockable(run_dir: Path) -> bool:
    """Whether another process could lock ``run_dir`` now (the lock is re-entrant within this one)."""
    code = f"from memtrain.io import acquire_dir_lock; acquire_dir_lock({str(run_dir)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.fixture()
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every model the HF engine is synced to; each sync reports ``sync_probe`` (its count so far)."""
    seen: list[Any] = []
    real = HFEngine.sync_weights

    def spy(self: HFEngine, model: Any) -> dict[str, float]:
        seen.append(model)
        return {**real(self, model), "sync_probe": float(len(seen))}

    monkeypatch.setattr(HFEngine, "sync_weights", spy)
    return seen


def test_setup_run_alone(tiny_model_dir: Path, tmp_path: Path, syncs: list[Any]) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    out = tmp_path / "run"
    run = setup_run(tiny_config(tiny_model_dir, data, QUIET), out)
    assert run is not None
    try:
        assert (run.start_step, run.position, run.streak) == (0, 0, 0)
        assert run.task.name == "proxy" and len(run.rows) == 4 and run.ref is not None
        assert run.engine.model is run.model and syncs == [run.model]  # synced once, before any step
        assert (out / "config.yaml").is_file() and not (out / "metrics.jsonl").exists()
        assert not _lockable(out)  # held from setup to close
        row = train_step(run, 1)
        assert row["step"] == 1 and run.position == row["data_position"] == 2
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    finally:
        close_run(run)
    assert _lockable(out)

    # resumed: from the latest checkpoint's step and data position; finished: nothing to set up
    train(tiny_config(tiny_model_dir, data, [*QUIET, "train.steps=2"]), tmp_path / "full")
    resumed = setup_run(tiny_config(tiny_model_dir, data, [*QUIET, "train.steps=3"]), tmp_path / "full",
                        resume=True)
    assert resumed is not None
    try:
        assert (resumed.start_step, resumed.position, resumed.streak) == (2, 4, 0)
    finally:
        close_run(resumed)
    done = setup_run(tiny_config(tiny_model_dir, data, [*QUIET, "train.steps=2"]), tmp_path / "full",
                     resume=True)
    assert done is None and _lockable(tmp_path / "full")


def test_engine_synced_before_the_first_step_and_after_every_update(tiny_model_dir: Path, tmp_path: Path,
                                                                    syncs: list[Any]) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    train(tiny_config(tiny_model_dir, data, QUIET), tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(syncs) == 1 + 2 and all(m is syncs[0] for m in syncs)
    assert [r["sync_probe"] for r in rows] == [2.0, 3.0] and all(r["time_sync_s"] >= 0 for r in rows)

    # no optimizer step, no sync: every group filtered (a random model never names the entity) ...
    syncs.clear()
    train(tiny_config(tiny_model_dir, data, ["train.tensorboard=false", "train.steps=1"]), tmp_path / "empty")
    (row,) = read_jsonl(tmp_path / "empty" / "metrics.jsonl")
    assert row["skipped_empty"] == 1.0 and len(syncs) == 1
    assert row["time_sync_s"] == 0.0 and "sync_probe" not in row
    # ... or a step undone (here: an update above optim.max_update_ratio)
    syncs.clear()
    huge = [*QUIET, "optim.lr=0.5", "optim.warmup_steps=0", "optim.weight_decay=0.1",
            "optim.max_update_ratio=0.01", "train.steps=1"]
    train(tiny_config(tiny_model_dir, data, huge), tmp_path / "huge")
    (row,) = read_jsonl(tmp_path / "huge" / "metrics.jsonl")
    assert row["skipped_nonfinite"] == 1.0 and len(syncs) == 1 and "sync_probe" not in row
