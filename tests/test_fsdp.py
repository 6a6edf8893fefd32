"""FSDP2 data parallel (``train.parallel=fsdp2``): 2 gloo processes with sharded weights take the same steps
as 1 process, through uneven rollouts, padded micro-batches, a checkpoint and a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from memtrain.config import ConfigError, RLConfig, load_config
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.io import read_jsonl
from memtrain.rl.logprobs import plan_micro_batches
from memtrain.rl.tasks.registry import TASKS
from memtrain.rl.update import accumulate_policy_gradients
from test_distributed import (
    OVERRIDES,
    ScriptedProxyTask,
    _free_port,
    assert_same_run,
    join_as_rank,
    leave_group,
    train_then_resume,
)
from test_rl_update import _grads, _load, _random_seqs
from train_helpers import tiny_config, write_proxy_dataset

# 80-token micro-batches: several per rank, and not as many on both ranks (padding passes); a clip below the
# gradient norm (clipping sharded gradients)
FSDP = [*OVERRIDES, "train.parallel=fsdp2", "rl.micro_batch_tokens=80", "optim.grad_clip=0.05"]
GATHERED = [*FSDP, "train.checkpoint_format=full"]  # rank 0 writes the Hugging Face layout


class UnevenRolloutTask(ScriptedProxyTask):
    """The scripted proxy task, plus greedy generation from the policy itself (the real HF engine) in
    1 + 2 x RANK separate calls: the ranks run different numbers of forward passes, as real rollouts do, and
    each records the log-probs of what it generated (functions of the weights it generated with)."""

    generated: ClassVar[list[list[float]]] = []

    def rollout(self, samples, engine, params, group_size, rng):
        greedy = GenerationRequest([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4))
        for _ in range(1 + 2 * int(os.environ.get("RANK", "0"))):
            (completion,) = engine.generate([greedy])[0]
        self.generated.append(completion.logprobs)
        return super().rollout(samples, engine, params, group_size, rng)


def _worker(rank: int, world: int, port: int, model_dir: str, data_dir: str, out_dir: str,
            report: str) -> None:
    join_as_rank(rank, world, port)
    from memtrain.rl import update

    TASKS["proxy"] = UnevenRolloutTask
    seen: list[dict[str, Any]] = []
    accumulate = update.accumulate_policy_gradients

    def recording(model, seqs, cfg, ref=None, totals=None, passes=None):
        plan = plan_micro_batches([s.length for s in seqs], cfg.micro_batch_tokens)
        seen.append({"micro_batches": len(plan), "passes": passes,
                     "sharded": [type(next(m.parameters())).__name__ for m in (model, ref)]})
        return accumulate(model, seqs, cfg, ref, totals=totals, passes=passes)

    update.accumulate_policy_gradients = recording
    train_then_resume(model_dir, data_dir, out_dir, GATHERED)
    done = {"updates": seen, "generated": UnevenRolloutTask.generated}
    Path(f"{report}.{rank}").write_text(json.dumps(done), encoding="utf-8")
    leave_group()


def test_fsdp2_takes_the_same_steps_as_one_process(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """1 process, 2 steps (train.parallel ignored) == 2 sharded gloo processes, 1 step + resume for step 2."""
    from memtrain.rl.trainer import train

    data = write_proxy_dataset(tmp_path / "data")
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.setitem(TASKS, "proxy", UnevenRolloutTask)
    monkeypatch.setattr(UnevenRolloutTask, "generated", [])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    # (FSDP2 runs a shared prompt with each of its sequences: the one process plans the same micro-batches)
    train(tiny_config(tiny_model_dir, data, [*GATHERED, "rl.share_prompts=false"]), single)
    args = (2, _free_port(), str(tiny_model_dir), str(data), str(double), str(tmp_path / "rep"))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rep.{r}").read_text()) for r in (0, 1))

    # really sharded (policy and KL reference), with padding passes on the rank with fewer micro-batches
    updates = r0["updates"] + r1["updates"]
    assert {tuple(u["sharded"]) for u in updates} == {("DTensor", "DTensor")}
    for a, b in zip(r0["updates"], r1["updates"], strict=True):
        assert a["passes"] == b["passes"] == max(a["micro_batches"], b["micro_batches"])
    assert any(u["micro_batches"] < u["passes"] for u in updates)
    # every rank generated with the full, current weights: what one process generates at that step
    assert len(r0["generated"]) == len(r1["generated"]) == len(UnevenRolloutTask.generated) == 2
    for lp0, lp1, lp in zip(r0["generated"], r1["generated"], UnevenRolloutTask.generated, strict=True):
        assert lp0 == pytest.approx(lp, abs=1e-5) and lp1 == pytest.approx(lp, abs=1e-5)
    assert UnevenRolloutTask.generated[0] != pytest.approx(UnevenRolloutTask.generated[1], abs=1e-4)

    # the same parameters after 2 steps (from the HF checkpoint rank 0 wrote), the same step statistics
    a, b = assert_same_run(single, double, tiny_model_dir, (
        "e2e_reward", "imr_match", "groups", "kept_rollouts", "num_seqs", "num_tokens", "num_micro_batches",
        "data_position", "loss", "kl", "grad_norm", "entropy", "lr"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(a) == sorted(b) == sorted(initial)  # the same layout (tied LM head not stored twice)
    assert all(r["skipped_nonfinite"] == 0.0 for r in read_jsonl(double / "metrics.jsonl"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(double / "checkpoints" / "latest")
    assert torch.equal(model.lm_head.weight, b["model.embed_tokens.weight"])


def _sharded_worker(rank: int, world: int, port: int, model_dir: str, data_dir: str, runs: list[str]) -> None:
    """2 ranks with sharded checkpoints (train.checkpoint_format=auto): runs[0] takes step 1 and is resumed
    for step 2; runs[1] takes step 1 only (the test resumes it in one process). No rank may gather the full
    state (gather_full_state raises)."""
    join_as_rank(rank, world, port)
    from memtrain.rl import checkpoint
    from memtrain.rl.trainer import train

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a sharded checkpoint gathered the full state")

    checkpoint.gather_full_state = refuse
    TASKS["proxy"] = ScriptedProxyTask
    train_then_resume(model_dir, data_dir, runs[0], FSDP)
    train(tiny_config(Path(model_dir), Path(data_dir), [*FSDP, "train.threads=1", "train.steps=1"]),
          Path(runs[1]))
    leave_group()


def test_fsdp2_sharded_checkpoints_resume_on_two_ranks_and_on_one_and_export(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank writes its own shards (no process holds the full optimizer state); a 2-rank run resumed
    on 2 ranks, and one resumed in a single process, take the same step 2 as one process from scratch; the
    exported model loads in transformers with that run's logits."""
    from transformers import AutoModelForCausalLM

    from memtrain.cli.main import main
    from memtrain.rl.trainer import train

    data = write_proxy_dataset(tmp_path / "data")
    single, double, mixed = tmp_path / "single", tmp_path / "double", tmp_path / "mixed"
    monkeypatch.setitem(TASKS, "proxy", ScriptedProxyTask)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    train(tiny_config(tiny_model_dir, data, [*GATHERED, "rl.share_prompts=false"]), single)
    runs = [str(double), str(mixed)]
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tiny_model_dir), str(data), runs), nprocs=2,
             join=True)
    step1 = mixed / "checkpoints" / "step_000001"
    shards = sorted(p.name for p in (step1 / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    assert not list(step1.glob("*.safetensors"))
    from memtrain.errors import UserError
    from memtrain.models import load_policy

    with pytest.raises(UserError, match="memtrain export"):  # not a model directory: one line says what to do
        load_policy(str(step1))
    # the 2-rank run resumed in this process (no process group): the sharded state loads into a plain model
    train(tiny_config(tiny_model_dir, data, [*FSDP, "train.steps=2"]), mixed, resume=True)

    assert main(["export", str(double), "--out", str(tmp_path / "double-hf")]) == 0
    hf = tmp_path / "double-hf"
    (double / "checkpoints" / "step_000002").rename(double / "checkpoints" / "sharded_step_2")
    (double / "checkpoints" / "step_000002").mkdir()
    (double / "checkpoints" / "step_000002" / "model.safetensors").symlink_to(hf / "model.safetensors")
    keys = ("e2e_reward", "imr_match", "num_seqs", "num_tokens", "data_position", "loss", "kl", "grad_norm")
    a, _ = assert_same_run(single, double, tiny_model_dir, keys)  # the exported step 2 of the 2-rank run
    c = load_file(str(mixed / "checkpoints" / "step_000002" / "model.safetensors"))  # 1 process: full format
    assert all(torch.allclose(a[k], c[k], atol=1e-5, rtol=0) for k in a)
    rows_a, rows_c = read_jsonl(single / "metrics.jsonl"), read_jsonl(mixed / "metrics.jsonl")
    for ra, rc in zip(rows_a, rows_c, strict=True):
        assert all(rc[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6) for k in keys)

    exported = AutoModelForCausalLM.from_pretrained(hf)
    trained = AutoModelForCausalLM.from_pretrained(single / "checkpoints" / "step_000002")
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, trained(ids).logits, atol=1e-4, rtol=0)


def test_fsdp2_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    from memtrain.rl.trainer import train

    assert load_config().train.parallel == "ddp"
    with pytest.raises(ConfigError, match=r"train\.parallel"):
        load_config(None, ["train.parallel=fsdp"])
    lora = tiny_config(tiny_model_dir, tmp_path / "data", ["train.parallel=fsdp2", "model.lora.rank=4"])
    with pytest.raises(ValueError, match="LoRA adapters are small"):
        train(lora, tmp_path / "run")


def test_padding_passes_add_nothing_and_a_nonfinite_loss_does_not_stop_them(tiny_model_dir: Path) -> None:
    """The lockstep update of one rank (``passes``): extra zero-weight passes leave the gradient and the stats
    as they were; a non-finite loss still runs every pass (each one is a collective under FSDP2)."""
    model, ref = _load(tiny_model_dir), _load(tiny_model_dir)
    seqs, cfg = _random_seqs(6, seed=5), RLConfig(micro_batch_tokens=40)
    n = len(plan_micro_batches([s.length for s in seqs], cfg.micro_batch_tokens))
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    plain = accumulate_policy_gradients(model, seqs, cfg, ref=ref)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    padded = accumulate_policy_gradients(model, seqs, cfg, ref=ref, passes=n + 2)
    assert len(forwards) == n + (n + 2) and n > 1
    assert padded == pytest.approx(plain, nan_ok=True)
    for g, w in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-7)

    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    forwards.clear()
    assert accumulate_policy_gradients(model, seqs, cfg, ref=ref)["nonfinite_loss"] == 1.0
    assert len(forwards) == 1  # stops at once without lockstep
    forwards.clear()
    assert accumulate_policy_gradients(model, seqs, cfg, ref=ref, passes=n + 1)["nonfinite_loss"] == 1.0
    assert len(forwards) == n + 1
