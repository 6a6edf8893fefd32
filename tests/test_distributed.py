"""Data-parallel training: 2 gloo processes take the same steps as 1; the collectives; the torchrun CLI."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from memtrain.engines.scripted import ScriptedEngine
from memtrain.io import read_jsonl
from memtrain.rl.distributed import DistContext, reduce_update_stats
from memtrain.rl.tasks.proxy import ProxyTask
from memtrain.rl.tasks.registry import TASKS
from train_helpers import config_yaml, scripted_responder, tiny_config, write_proxy_dataset

# answers long enough for the scripted replies; 4 rows = 2 per rank; float32 compute: 1 and 2 processes sum
# the same gradient in a different order, which bf16 rounding would blur beyond the 1e-5 the test holds
OVERRIDES = ["agent.memory_tokens=8", "agent.answer_tokens=16", "train.batch_size=4", "train.steps=2",
             "train.tensorboard=false", "model.compute_dtype=float32"]


class ScriptedProxyTask(ProxyTask):
    """The proxy task on a scripted engine, one row at a time with a row-seeded IMR stream: its rollouts
    depend on the row only, not on which rank rolls it out or next to which rows (the model still trains
    for real)."""

    def rollout(self, samples, engine, params, group_size, rng):
        scripted = ScriptedEngine(scripted_responder, self.tokenizer)
        rollouts, counters = [], defaultdict(float)
        for sample in samples:
            new, c = super().rollout([sample], scripted, params, group_size, random.Random(sample["id"]))
            rollouts += new
            for key, value in c.items():
                counters[key] += value
        return rollouts, dict(counters)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collectives(ctx: DistContext) -> dict[str, Any]:
    """Each collective once, with rank-dependent inputs, for the parent to check."""
    out: dict[str, Any] = {"shard": ctx.shard(list(range(5)))}
    out["sum"] = ctx.sum_values({"a": 1.0 + ctx.rank, f"only{ctx.rank}": 2.0})
    # rank 0: 1 sequence of its own session; rank 1: 2 sequences of one session (a 2-turn trajectory)
    seq = type("S", (), {"completion_ids": [0] * (3 + ctx.rank), "session": "t" if ctx.rank else None})()
    out["totals"] = ctx.totals([seq] * (ctx.rank + 1))
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(ctx.rank + 1))  # b: a gradient on rank 1 only
    if ctx.rank == 1:
        b.grad = torch.ones(2)
    unused = torch.nn.Parameter(torch.zeros(1))
    out["finite"] = ctx.reduce_gradients([a, b, unused], finite=True)
    out["grads"] = [a.grad.tolist(), b.grad.tolist(), unused.grad]
    out["nonfinite"] = ctx.reduce_gradients([a], finite=ctx.rank == 0)
    try:
        ctx.on_main(lambda: 1 / 0)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["main"] = ctx.on_main(lambda: f"from rank {ctx.rank}")
    return out


def join_as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` on this host, one torch thread each."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def leave_group() -> None:
    """End a spawned rank: leave the process group, then exit without running interpreter teardown, where
    gloo's threads can still abort a rank that finished ("terminate called without an active exception")
    and fail the test after every assertion it feeds has passed. Outputs are written before this."""
    from memtrain.rl.distributed import shutdown

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_then_resume(model_dir: str, data_dir: str, out_dir: str, overrides: list[str]) -> None:
    """Step 1, then a resumed run (same world size) for step 2."""
    from memtrain.rl.trainer import train

    for steps, resume in ((1, False), (2, True)):
        over = [*overrides, "train.threads=1", f"train.steps={steps}"]
        train(tiny_config(Path(model_dir), Path(data_dir), over), Path(out_dir), resume=resume)


def assert_same_run(single: Path, double: Path, initial_dir: Path,
                    keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both runs really trained and end with the same step-2 parameters and per-step ``keys`` (rank 0
    alone wrote the 2-process run's); returns both step-2 state dicts."""
    a = load_file(str(single / "checkpoints" / "step_000002" / "model.safetensors"))
    b = load_file(str(double / "checkpoints" / "step_000002" / "model.safetensors"))
    initial = load_file(str(initial_dir / "model.safetensors"))
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-3  # both really trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    rows_a, rows_b = read_jsonl(single / "metrics.jsonl"), read_jsonl(double / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    return a, b


def _worker(rank: int, world: int, port: int, model_dir: str, data_dir: str, out_dir: str,
            report: str, overrides: list[str]) -> None:
    join_as_rank(rank, world, port)
    from memtrain.rl.distributed import init_from_env

    TASKS["proxy"] = ScriptedProxyTask
    ctx = init_from_env("cpu")
    Path(f"{report}.{rank}").write_text(json.dumps(_collectives(ctx)), encoding="utf-8")
    train_then_resume(model_dir, data_dir, out_dir, overrides)
    leave_group()


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "session_mean"])
def test_two_processes_take_the_same_steps_as_one(tiny_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, loss_agg: str) -> None:
    """1 process, 2 steps == 2 gloo processes, 1 step + resume for step 2 (parameters and step statistics).
    session_mean: the global number of sessions (trajectories + IMR samples) normalises every rank's loss."""
    from memtrain.rl.trainer import train

    data = write_proxy_dataset(tmp_path / "data")
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.setitem(TASKS, "proxy", ScriptedProxyTask)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = [*OVERRIDES, f"rl.loss_agg={loss_agg}"]
    train(tiny_config(tiny_model_dir, data, overrides), single)
    args = (2, _free_port(), str(tiny_model_dir), str(data), str(double), str(tmp_path / "rep"), overrides)
    mp.spawn(_worker, args=args, nprocs=2, join=True)

    # the collectives, as each rank saw them
    r0, r1 = (json.loads((tmp_path / f"rep.{r}").read_text()) for r in (0, 1))
    assert (r0["shard"], r1["shard"]) == ([0, 1], [2, 3, 4])
    assert r0["sum"] == r1["sum"] == {"a": 3.0, "only0": 2.0, "only1": 2.0}
    # (sequences, tokens, sessions): rank 0: 1 seq of 3 tokens, 1 session; rank 1: 2 of 4 tokens, 1 session
    assert r0["totals"] == r1["totals"] == [3, 3 + 2 * 4, 2]
    assert r0["grads"] == r1["grads"] == [[3.0, 3.0, 3.0], [1.0, 1.0], None]
    assert r0["finite"] and not r0["nonfinite"] and not r1["nonfinite"]
    assert r0["error"] == "ZeroDivisionError: division by zero"
    assert r1["error"] == "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"
    assert r0["main"] == r1["main"] == "from rank 0"

    # the same parameters after 2 steps, and the same step statistics (rank 0 alone wrote them)
    assert_same_run(single, double, tiny_model_dir, (
        "e2e_reward", "imr_match", "groups", "filtered_groups", "kept_rollouts", "num_seqs", "num_tokens",
        "tokens_generated", "documents", "samples", "data_position", "loss", "kl", "grad_norm", "entropy",
        "adv_abs_mean", "num_sessions"))
    assert len(read_jsonl(double / "samples.jsonl")) == len(read_jsonl(single / "samples.jsonl"))


def test_update_stats_combine_over_ranks() -> None:
    class TwoRanks(DistContext):
        def all_gather_object(self, obj):
            return [obj, {**obj, "loss": 0.5, "num_seqs": 3.0, "num_tokens": 30.0, "num_sessions": 2.0,
                          "entropy": 2.0,
                          "adv_mean": -1.0, "ratio_min": 0.5, "ratio_max": 1.1,
                          "old_logprob_source": "recomputed"}]

    mine = {"loss": 0.25, "num_seqs": 1.0, "num_tokens": 10.0, "num_sessions": 1.0, "entropy": 1.0,
            "adv_mean": 1.0, "ratio_min": 0.9, "ratio_max": 1.5, "grad_norm": 0.7,
            "old_logprob_source": "sampler"}
    out = reduce_update_stats(mine, TwoRanks(rank=0, world_size=2))
    assert out["loss"] == 0.75 and out["num_seqs"] == 4.0 and out["num_tokens"] == 40.0
    assert out["num_sessions"] == 3.0  # sessions never straddle ranks: they add up
    assert out["entropy"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)  # token-weighted
    assert out["adv_mean"] == pytest.approx((1.0 - 3.0) / 4)  # sequence-weighted
    assert (out["ratio_min"], out["ratio_max"], out["grad_norm"]) == (0.5, 1.5, 0.7)
    assert out["old_logprob_source"] == "mixed"
    assert reduce_update_stats(mine, DistContext()) is mine
    assert DistContext(rank=1, world_size=3).shard(list(range(7))) == [2, 3]
    assert not math.isnan(out["entropy"])


def test_torchrun_cli_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The user path: torchrun -m memtrain train with the real task and HF engine; rank 0 alone writes."""
    data = write_proxy_dataset(tmp_path / "data")
    cfg = config_yaml(tiny_model_dir, data, tmp_path / "c.yaml")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMTRAIN_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "memtrain", "train", "--config", str(cfg), "--out", str(run), "train.threads=1", "train.steps=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = read_jsonl(run / "metrics.jsonl")  # one row: only rank 0 writes
    assert row["step"] == 1 and row["samples"] == 2 and row["documents"] == 2  # both ranks' rows counted
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert done.stdout.count("curves: memtrain plot") == 1  # the summary, from rank 0 alone
    assert "destroy_process_group" not in done.stderr  # each rank left the process group


def test_shutdown_leaves_a_process_group_it_did_not_create(monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process the vLLM engine creates its own process group and destroys it at exit; the trainer's
    shutdown destroying it first made that exit raise "Invalid process group specified" after a finished
    run. A group init_from_env created is still left by shutdown (the 2-process tests above)."""
    import torch.distributed as dist

    from memtrain.rl.distributed import init_from_env, shutdown

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # as vLLM does in process
    try:
        assert init_from_env("cpu").world_size == 1  # one process: nothing joined, nothing owned
        shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("launched", [True, False])
def test_fsdp2_under_torchrun_with_one_process_joins_a_group_of_one(launched: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 1 with train.parallel=fsdp2 runs the sharded paths on one device (the GPU
    check does); a process torchrun did not start stays out of any group, whatever train.parallel says."""
    import torch.distributed as dist

    from memtrain.rl.distributed import init_from_env, shutdown

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    if launched:
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
    try:
        ctx = init_from_env("cpu", "fsdp2")
        assert (ctx.fsdp, ctx.enabled, dist.is_initialized()) == (launched, launched, launched)
        assert ctx.sum_values({"a": 2.0}) == {"a": 2.0} and ctx.world_size == 1
        assert not init_from_env("cpu", "ddp").enabled  # ddp in one process: never a group
    finally:
        shutdown(barrier=False)
