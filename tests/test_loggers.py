"""Loggers beside metrics.jsonl: Weights & Biases (offline, no network) gets every step's numbers and the
config, and a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from memtrain.io import read_jsonl
from memtrain.rl.trainer import train
from train_helpers import tiny_config, write_proxy_dataset

pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of 7-byte-headed chunks
    after a 7-byte file header), read independently of the W&B client that wrote them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def history(run_dir: Path) -> tuple[set[str], dict[int, dict[str, Any]]]:
    """(the W&B run ids, step -> logged values) over every .wandb file of ``run_dir``."""
    ids, steps = set(), {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids.add(path.stem.removeprefix("run-"))
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                steps.setdefault(int(values["_step"]), {}).update(values)
    return ids, steps


def test_wandb_offline_logs_every_step_and_a_resume_continues_the_run(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    over = ["train.wandb=true", "train.tensorboard=false", "train.wandb_project=memtrain-test"]
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=2"]), run)
    train(tiny_config(tiny_model_dir, data, [*over, "train.steps=3"]), run, resume=True)

    ids, steps = history(run)
    assert len(ids) == 1 and (run / "wandb_id").read_text().strip() in ids  # one W&B run, resumed
    rows = read_jsonl(run / "metrics.jsonl")
    assert sorted(steps) == [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        logged = steps[row["step"]]
        for key in ("loss", "kept_groups", "num_tokens", "time_update_s"):
            if row.get(key) is not None:
                assert logged[f"train/{key}"] == pytest.approx(row[key]), key
    starts = [r.run for p in (run / "wandb").glob("offline-run-*/run-*.wandb") for r in wandb_records(p)
              if r.WhichOneof("record_type") == "run"]
    assert [s.project for s in starts] == ["memtrain-test"] * 2 and {s.run_id for s in starts} == ids
    config = {i.key: json.loads(i.value_json) for i in starts[0].config.update}
    assert config["rl"]["group_size"] == 2 and config["train"]["wandb"] is True  # the run's config


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from memtrain.errors import UserError
    from memtrain.rl.metrics import start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"^train.wandb=true: the wandb package is not installed; pip"):
        start_wandb(tmp_path, "memtrain", "offline", {})
    assert not (tmp_path / "wandb_id").exists()
