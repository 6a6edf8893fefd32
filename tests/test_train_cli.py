"""`memtrain train` / `plot` / `merge-lora` end to end: run outputs, refusals, a killed run resumed, LoRA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtrain.cli.main import main
from memtrain.io import read_jsonl
from memtrain.rl.metrics import REQUIRED_COLUMNS
from train_helpers import config_yaml, write_proxy_dataset


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_proxy_dataset(tmp_path / "data")


def test_train_writes_a_complete_run_and_plots(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "e2e_reward" in out.splitlines()[0] and f"memtrain plot {run}" in out
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(REQUIRED_COLUMNS) <= set(row)
        assert row["reward_metric"] == "strict_em" and row["tokens_generated"] > 0
        assert row["time_rollout_s"] > 0 and row["step_time_s"] >= row["time_update_s"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    samples = read_jsonl(run / "samples.jsonl")
    assert {"question", "gold", "memories", "answer", "reward", "advantage", "imr"} <= set(samples[0])
    assert (run / "config.yaml").is_file()
    assert os.readlink(run / "checkpoints" / "latest") == "step_000002"  # a relative symlink

    assert main(["plot", str(run), "--table"]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(run.glob("plots/*.png"))
    assert [p.name for p in pngs] == ["kl.png", "lengths.png", "rewards.png", "timings.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert str(pngs[0]) in printed and "step" in printed

    # an existing run is never overwritten, and resumes only with the same config
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 1
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "rl.group_size=3", "--out", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "rl.group_size: 2 -> 3" in err
    # more steps may be added; --config defaults to the run's own
    assert main(["train", "--out", str(run), "--resume", "train.steps=3"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_train_refuses_remote_engine_and_missing_data(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "tiny.yaml")
    # an engine that cannot follow the policy (no sync_weights) is refused before the run is written
    remote = ["engine.kind=openai", "engine.base_url=http://127.0.0.1:9/v1"]
    assert main(["train", "--config", str(cfg), *remote, "--out", str(tmp_path / "r1")]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "engine.kind=openai: this engine cannot follow the policy being trained" in line
    assert not (tmp_path / "r1" / "config.yaml").exists()
    assert (
        main(["train", "--config", str(cfg), f"data.path={tmp_path / 'nope'}", "--out", str(tmp_path / "r2")])
        == 1
    )
    assert "nope" in capsys.readouterr().err


def test_killed_run_resumes_and_loses_at_most_a_step(
    tiny_model_dir: Path, data: Path, tmp_path: Path
) -> None:
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    env = {**os.environ, "MEMTRAIN_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memtrain",
            "train",
            "--config",
            str(cfg),
            "train.steps=50",
            "train.tensorboard=false",
            "--out",
            str(run),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    _, err = proc.communicate()
    assert latest.exists(), err.decode()[-2000:]
    done = int(os.readlink(latest).split("_")[1])
    assert 1 <= done < 50
    target = done + 2
    assert main(["train", "--out", str(run), "--resume", f"train.steps={target}"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, target + 1))
    assert os.readlink(latest) == f"step_{target:06d}"


def test_lora_run_resumes_and_merges(tiny_model_dir: Path, data: Path, tmp_path: Path) -> None:
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "lora.yaml")
    run = tmp_path / "run"
    lora = ["model.lora.rank=4", "model.lora.alpha=8", "rl.dynamic_filter=false", "train.tensorboard=false"]
    # --resume on a new directory starts the run (what scripts/demo.sh relies on)
    assert main(["train", "--config", str(cfg), *lora, "train.steps=1", "--out", str(run), "--resume"]) == 0
    assert main(["train", "--config", str(cfg), *lora, "train.steps=2", "--out", str(run), "--resume"]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kl"] is not None
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(ckpt), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    # memtrain export: the run's newest checkpoint merged (as merge-lora), or its adapter kept as it is
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    from safetensors.torch import load_file

    a = load_file(str(merged / "model.safetensors"))
    b = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
    assert main(["export", str(run), "--adapter", "--out", str(tmp_path / "adapter")]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(
        p.name for p in ckpt.iterdir() if p.name not in ("trainer_state.pt", "meta.json"))


def test_export_of_a_full_run_and_what_it_refuses(tiny_model_dir: Path, data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    cfg = config_yaml(tiny_model_dir, data, tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "train.steps=1", "train.tensorboard=false", "--out",
                 str(run)]) == 0
    out = tmp_path / "hf"
    assert main(["export", str(run / "checkpoints" / "latest"), "--out", str(out)]) == 0
    saved = load_file(str(run / "checkpoints" / "step_000001" / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert all(bool((saved[k] == exported[k]).all()) for k in saved)
    assert not (out / "trainer_state.pt").exists() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    (tmp_path / "global_step_5" / "actor").mkdir(parents=True)
    assert main(["export", str(tmp_path / "global_step_5"), "--out", str(tmp_path / "x")]) != 0
    assert "verl.model_merger" in capsys.readouterr().err
    assert main(["export", str(run / "checkpoints" / "latest"), "--adapter", "--out",
                 str(tmp_path / "y")]) != 0
    assert "holds full weights" in capsys.readouterr().err
    tok = run / "checkpoints" / "step_000001" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes().replace(b"a", b"b", 1))  # damaged after it was written, same size
    assert main(["export", str(run / "checkpoints" / "step_000001"), "--out", str(tmp_path / "z")]) != 0
    assert "sha256" in capsys.readouterr().err
