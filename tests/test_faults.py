"""Fault suite: real ``memtrain`` processes SIGKILLed at exact points, then resumed.

Each process runs through ``DRIVER`` (written to a temp dir), which wraps one function of memtrain so that
its N-th call kills the process (or pauses it, to test the run-directory lock while it is alive) on entry
or on return: the points are exact, and the product has no test hooks. After every kill the run directory
must show at most the step in flight lost; after the last resume the metrics hold every step exactly once
and the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memtrain.cli.main import main
from memtrain.data.dataset import dataset_fingerprint
from memtrain.errors import UserError
from memtrain.io import read_jsonl
from memtrain.rl import checkpoint as ck
from memtrain.rl.checkpoint import latest_checkpoint
from memtrain.rl.tasks.registry import TASKS
from memtrain.rl.trainer import train
from train_helpers import ParityTask, config_yaml, poison_updates, tiny_config, write_proxy_dataset

DRIVER = r'''
"""memtrain ARGS, with MEMTRAIN_FAULT="module:attr:N:enter|exit:kill|pause" (attr may be Class.method):
the N-th call of attr kills this process with SIGKILL (pause: writes $MEMTRAIN_FAULT_FILE and sleeps, to be
killed by the test). MEMTRAIN_FAULT_AFTER="module:attr:M": count calls only once the M-th call of that
function has begun. MEMTRAIN_PARITY=1: train.task=longqa rewards even token ids (real gradients)."""
import importlib, os, signal, sys, time
from pathlib import Path


def resolve(spec):
    module, attr = spec.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def wrap(spec, on_call):
    owner, name = resolve(spec)
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        return on_call(real, args, kwargs)

    setattr(owner, name, wrapper)


armed = [True]
if os.environ.get("MEMTRAIN_FAULT_AFTER"):
    arm_target, arm_n = os.environ["MEMTRAIN_FAULT_AFTER"].rsplit(":", 1)
    armed[0], arm_calls = False, [0]

    def arm(real, args, kwargs):
        arm_calls[0] += 1
        armed[0] = armed[0] or arm_calls[0] == int(arm_n)
        return real(*args, **kwargs)

    wrap(arm_target, arm)

target, n, when, action = os.environ["MEMTRAIN_FAULT"].rsplit(":", 3)
calls = [0]


def fire():
    if action == "pause":
        Path(os.environ["MEMTRAIN_FAULT_FILE"]).write_text(str(os.getpid()))
        time.sleep(300)
    os.kill(os.getpid(), signal.SIGKILL)


def fault(real, args, kwargs):
    calls[0] += armed[0]
    hit = armed[0] and calls[0] == int(n)
    if hit and when == "enter":
        fire()
    out = real(*args, **kwargs)
    if hit and when == "exit":
        fire()
    return out


wrap(target, fault)
if os.environ.get("MEMTRAIN_PARITY"):
    sys.path.insert(0, os.environ["MEMTRAIN_TESTS"])
    from memtrain.rl.tasks.registry import TASKS
    from train_helpers import ParityTask

    TASKS["longqa"] = ParityTask
from memtrain.cli.main import main

sys.exit(main(sys.argv[1:]))
'''

TIMING = ("time_rollout_s", "time_update_s", "time_sync_s", "step_time_s")
TRAIN_OVER = ["train.task=longqa", "rl.group_size=3", "optim.lr=1e-2", "train.keep_last=5", "train.steps=3",
              "train.tensorboard=false"]


@pytest.fixture()
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "fault_driver.py"
    path.write_text(DRIVER, encoding="utf-8")
    return path


def _spawn(driver: Path, args: list[str], fault: str, after: str | None = None,
           pause_file: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MEMTRAIN_NO_PROGRESS": "1", "MEMTRAIN_FAULT": fault, "MEMTRAIN_PARITY": "1",
           "MEMTRAIN_TESTS": str(Path(__file__).parent), "OMP_NUM_THREADS": "2"}
    env.pop("MEMTRAIN_FAULT_AFTER", None)
    if after:
        env["MEMTRAIN_FAULT_AFTER"] = after
    if pause_file is not None:
        env["MEMTRAIN_FAULT_FILE"] = str(pause_file)
    return subprocess.Popen([sys.executable, str(driver), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _killed(proc: subprocess.Popen[bytes]) -> str:
    """Wait for the process, which must have died of SIGKILL (not finished, not failed)."""
    _, err = proc.communicate(timeout=240)
    text = err.decode(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {text}"
    return text


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = proc.communicate()
            pytest.fail(f"the paused point was never reached: {err.decode(errors='replace')[-3000:]}")
        time.sleep(0.05)


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.exists() else []


def _latest(run: Path) -> str | None:
    """The newest complete checkpoint (what a resume takes), whatever ``latest`` says."""
    found = latest_checkpoint(run)
    return None if found is None else found.name


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def test_training_killed_at_every_phase_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path, driver: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(TASKS, "longqa", ParityTask)
    data = write_proxy_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    train(tiny_config(tiny_model_dir, data, TRAIN_OVER), straight)

    cfg = config_yaml(tiny_model_dir, data, tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    fresh = ["train", "--config", str(cfg), *TRAIN_OVER, "--out", str(run)]
    resume = ["train", "--out", str(run), "--resume"]

    # 1. mid-rollout of step 2 (after its second generation call), paused: a second trainer on the same
    # --out is refused, naming the holder; then SIGKILL, which frees the lock
    pause = tmp_path / "paused"
    proc = _spawn(driver, fresh, "memtrain.engines.hf:HFEngine.generate:2:exit:pause",
                  after="memtrain.rl.trainer:collect_rollouts:2", pause_file=pause)
    _wait_for(pause, proc)
    capsys.readouterr()
    assert main(resume) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert line.startswith(f"memtrain train: error: {run} is in use by another memtrain process "
                           f"(pid {proc.pid} on ")
    proc.send_signal(signal.SIGKILL)
    _killed(proc)
    assert (_steps(run), _latest(run)) == ([1], "step_000001")

    # 2. in the update of step 2: gradients computed, optimizer step not taken
    _killed(_spawn(driver, resume, "memtrain.rl.update:accumulate_policy_gradients:1:exit:kill"))
    assert (_steps(run), _latest(run)) == ([1], "step_000001")

    # 3. writing checkpoint 2: every file in the temp dir, before fsync + rename (step 2 was logged)
    _killed(_spawn(driver, resume, "memtrain.io:fsync_tree:1:enter:kill"))
    assert (_steps(run), _latest(run)) == ([1, 2], "step_000001")
    assert list((run / "checkpoints").glob(".tmp-step_000002-*"))
    assert not (run / "checkpoints" / "step_000002").exists()

    # 4. checkpoint 2 renamed into place, `latest` not yet moved: resume must still take step 2
    _killed(_spawn(driver, resume, "memtrain.rl.checkpoint:point_latest:1:enter:kill"))
    assert (_steps(run), _latest(run)) == ([1, 2], "step_000002")
    assert os.readlink(run / "checkpoints" / "latest") == "step_000001"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the killed writer's temp dir was cleaned

    # 5. resumed to the end: every step once, the redone one's old row kept aside, weights as uninterrupted
    assert main(resume) == 0
    assert _steps(run) == [1, 2, 3] and _latest(run) == "step_000003"
    assert [r["step"] for r in read_jsonl(run / "metrics.dropped.jsonl")] == [2]
    a, b = _weights(straight, 3), _weights(run, 3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a, rows_b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {
            k: v for k, v in rb.items() if k not in TIMING}
    assert [r["step"] for r in read_jsonl(run / "samples.jsonl")] == [
        r["step"] for r in read_jsonl(straight / "samples.jsonl")]


def test_eval_killed_mid_run_resumes_to_the_same_examples(
    tiny_model_dir: Path, tmp_path: Path, driver: Path
) -> None:
    from memtrain.eval.proxy import run_proxy_eval
    from memtrain.io import DirLockedError

    data = write_proxy_dataset(tmp_path / "data", n=3)
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "tiny.yaml")
    out = tmp_path / "eval"
    args = ["eval", "proxy", "--config", str(cfg), "--data", str(data), "--out", str(out),
            "--batch-size", "1"]
    pause = tmp_path / "paused"
    # paused after its second batch was appended: a second evaluation of the same --out is refused
    proc = _spawn(driver, args, "memtrain.eval.runner:append_jsonl:2:exit:pause", pause_file=pause)
    _wait_for(pause, proc)
    config = tiny_config(tiny_model_dir, data)
    held = rf"^{out} is in use by another memtrain process \(pid {proc.pid} on "
    with pytest.raises(DirLockedError, match=held):
        run_proxy_eval(config, data, out, batch_size=1)
    proc.send_signal(signal.SIGKILL)
    _killed(proc)
    assert len(read_jsonl(out / "examples.jsonl")) == 2 and not (out / "summary.json").exists()

    resumed = run_proxy_eval(config, data, out, batch_size=1)
    straight = run_proxy_eval(config, data, tmp_path / "straight", batch_size=1)
    assert resumed["ids"] == straight["ids"]
    assert read_jsonl(out / "examples.jsonl") == read_jsonl(tmp_path / "straight" / "examples.jsonl")


def test_eval_failed_start_leaves_no_eval_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model that cannot load fails before eval.json, so the same --out is then accepted."""
    from memtrain.eval.proxy import run_proxy_eval

    data = write_proxy_dataset(tmp_path / "data", n=1)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="missing-model"):
        run_proxy_eval(tiny_config(tmp_path / "missing-model", data), data, out)
    assert not (out / "eval.json").exists()
    assert run_proxy_eval(tiny_config(tiny_model_dir, data), data, out)["n"] == 1


def test_data_build_killed_leaves_nothing_that_looks_complete(
    tiny_model_dir: Path, tmp_path: Path, driver: Path
) -> None:
    from data_helpers import build_ruler_ner, make_articles, write_jsonl
    from memtrain.data.dataset import load_rows

    out = tmp_path / "proxy-set"
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("\n".join(f"{k}: {v}" for k, v in {
        "corpus": write_jsonl(tmp_path / "corpus.jsonl", make_articles(n_per_topic=10, seed=1)),
        "ner_model": build_ruler_ner(tmp_path / "ruler"), "tokenizer": tiny_model_dir, "out": out,
        "cache_dir": tmp_path / "cache", "retriever": "bm25", "passages": 8, "related": 3, "min_tokens": 0,
        "max_tokens": 100000, "num_docs": 12, "shard_size": 4, "workers": 1}.items()) + "\n")
    # killed as it writes its second parquet shard
    build = ["data", "proxy", "--config", str(cfg)]
    _killed(_spawn(driver, build, "pyarrow.parquet:write_table:2:enter:kill"))
    assert not out.exists()
    assert [p.name.startswith(".tmp-proxy-set-") for p in tmp_path.glob(".tmp-*")] == [True]
    with pytest.raises(FileNotFoundError):
        load_rows(out)
    assert main(build) == 0  # the same command, rerun, succeeds
    assert len(load_rows(out)) == 12
    assert not list(tmp_path.glob(".tmp-*"))  # the dead writer's temp dir was removed


def test_dense_index_build_killed_mid_embedding_resumes_to_the_same_index(
    minilm_dir: str, tmp_path: Path, driver: Path
) -> None:
    """#27: killed after its third embedding shard, the build keeps those shards; rerun, it embeds only the
    missing ones and writes the index an uninterrupted build writes."""
    import numpy as np

    from data_helpers import make_articles
    from memtrain.retrieval.embed import missing_shards
    from memtrain.retrieval.service import Retriever, shards_dir

    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for i, a in enumerate(make_articles(n_per_topic=4, seed=2)):
            for j, para in enumerate(a["text"].split("\n")):
                fh.write(json.dumps({"id": f"{i}-{j}", "contents": f'"{a["title"]}"\n{para}'}) + "\n")
    build = ["build-index", "--corpus", str(corpus), "--kind", "dense", "--shard-size", "4"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    fault = "memtrain.retrieval.embed:_save_shard:3:exit:kill"
    _killed(_spawn(driver, [*build, "--index", str(killed)], fault))
    assert not killed.exists() and len(missing_shards(shards_dir(killed))) > 0
    done = sorted(p.name for p in shards_dir(killed).glob("emb-*.npy"))
    assert done == ["emb-000000.npy", "emb-000001.npy", "emb-000002.npy"]
    stamps = {p: p.stat().st_mtime_ns for p in shards_dir(killed).glob("emb-*.npy")}
    assert main([*build, "--index", str(killed)]) == 0  # resumed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the first three were not redone
    assert main([*build, "--index", str(straight)]) == 0
    a, b = (Retriever.open(d).index.index for d in (killed, straight))
    assert a.ntotal == b.ntotal and np.array_equal(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal))


# --- silent wrong results (#24): a resume checks what it resumes, the last update is always saved --------


def _nan_into(weights: Path) -> None:
    """Write NaN over the first 4 bytes of the first tensor's data: the file keeps its exact size."""
    raw = bytearray(weights.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header:8 + header + 4] = bytes([0x00, 0x00, 0xC0, 0x7F])  # a float32 NaN
    weights.write_bytes(bytes(raw))


def test_damaged_checkpoint_of_the_right_size_is_not_resumed(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data, ["train.steps=2", "train.keep_last=2"]), run)
    ckpts = run / "checkpoints"
    newest = ckpts / "step_000002" / "model.safetensors"
    size = newest.stat().st_size
    _nan_into(newest)
    assert newest.stat().st_size == size and ck.incomplete_reason(newest.parent) is None  # sizes still agree
    assert "does not match the sha256" in str(ck.damage_reason(newest.parent))
    # the resume falls back to the newest checkpoint that verifies, says so, and redoes step 2
    caplog.set_level("WARNING", logger="memtrain")
    assert ck.resume_checkpoint(run) == ckpts / "step_000001"
    assert "step_000002 is damaged" in caplog.text
    train(tiny_config(tiny_model_dir, data, ["train.steps=2", "train.keep_last=2"]), run, resume=True)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    weights = load_file(str(newest))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    # a checkpoint written before hashes were recorded is still checked for non-finite weights
    meta = json.loads((newest.parent / ck.META_FILE).read_text())
    del meta["sha256"]
    (newest.parent / ck.META_FILE).write_text(json.dumps(meta))
    _nan_into(newest)
    assert "holds NaN or infinity" in str(ck.damage_reason(newest.parent))
    # none verifies: refused, naming each
    _nan_into(ckpts / "step_000001" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint verifies \(step_000002: .*; step_000001: "):
        ck.resume_checkpoint(run)


def test_resume_on_a_rebuilt_dataset_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data, ["train.steps=1"]), run)
    before = dataset_fingerprint(data)
    shutil.rmtree(data)
    write_proxy_dataset(data, n=3)  # rebuilt with other rows
    with pytest.raises(UserError, match=rf"fingerprint {before}, but data\.path=.* now holds "
                                        rf"{dataset_fingerprint(data)}"):
        train(tiny_config(tiny_model_dir, data, ["train.steps=2"]), run, resume=True)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]


def test_the_last_step_is_saved_even_when_it_is_skipped(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint_every 2, 4 steps, step 4 non-finite: step 3's update must be in a checkpoint."""
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    poison_updates(monkeypatch, lambda n: n == 4)
    overrides = ["rl.dynamic_filter=false", "train.steps=4", "train.checkpoint_every=2", "train.keep_last=3"]
    train(tiny_config(tiny_model_dir, data, overrides), run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in rows] == [0.0, 0.0, 0.0, 1.0]
    assert os.readlink(run / "checkpoints" / "latest") == "step_000004"
    after_2 = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    after_4 = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    assert any(not torch.equal(after_2[k], after_4[k]) for k in after_2)  # step 3's update is saved


def test_a_damaged_metrics_row_is_kept_not_dropped(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data, ["train.steps=2", "train.keep_last=2"]), run)
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    damaged = text.rstrip("\n").rsplit("\n", 1)[1][:-7]  # the last row, cut short
    metrics.write_text(text.rstrip("\n").rsplit("\n", 1)[0] + "\n" + damaged)
    caplog.set_level("WARNING", logger="memtrain")
    train(tiny_config(tiny_model_dir, data, ["train.steps=3", "train.keep_last=2"]), run, resume=True)
    assert "not a complete JSON row" in caplog.text
    kept = read_jsonl(run / "metrics.dropped.jsonl")
    assert [r["damaged_text"] for r in kept if "damaged_text" in r] == [damaged]
    # step 2 was checkpointed, so it is not redone: its row is missing from metrics.jsonl, but not lost
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 3]
