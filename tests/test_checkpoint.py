"""Checkpoints: atomic layout, latest pointer, pruning, stale temp dirs, fingerprints, RNG, LoRA merge."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from memtrain.config import LoraConfig, OptimConfig, load_config
from memtrain.models import load_policy, load_tokenizer
from memtrain.rl import checkpoint as ck
from memtrain.rl.export import merge_lora
from memtrain.rl.optim import apply_lora, build_optimizer, build_scheduler


def _setup(model_dir: Path, lora: bool = False):
    model = load_policy(str(model_dir), "float32", "cpu")
    if lora:
        model = apply_lora(model, LoraConfig(rank=4, alpha=8))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=2))
    return model, load_tokenizer(str(model_dir)), opt, build_scheduler(opt, 2)


def _step(model, opt, sched) -> None:
    x = torch.arange(3, 20)[None]
    model(input_ids=x).logits.float().pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_save_latest_prune_and_resume_state(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok, opt, sched = _setup(tiny_model_dir)
    run = tmp_path / "run"
    assert ck.latest_checkpoint(run) is None
    for step in (1, 2, 3):
        _step(model, opt, sched)
        ck.save_checkpoint(
            run,
            step,
            model,
            tok,
            opt,
            sched,
            {"data_position": 2 * step, "nonfinite_streak": 0, "fingerprint": "abc"},
            keep_last=2,
            model_name=str(tiny_model_dir),
        )
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 3]
    latest = ck.latest_checkpoint(run)
    assert latest == run / "checkpoints" / "step_000003"
    state = ck.load_trainer_state(latest)
    assert state["step"] == 3 and state["data_position"] == 6 and state["scheduler"]["last_epoch"] == 3
    # the saved weights are the model's, bit for bit, and load as a normal HF checkpoint
    # `latest` is a symlink: usable as a model path as it is
    reloaded = load_policy(str(run / "checkpoints" / "latest"), "float32", "cpu")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # optimizer state restores into a fresh optimizer over the reloaded weights
    _, _, opt2, sched2 = _setup(latest)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    # a killed writer's temp dir is ignored, then cleaned; a dangling latest is an error, not a restart
    (run / "checkpoints" / ".tmp-step_000004-xyz").mkdir()
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 3]
    assert len(ck.remove_partial_checkpoints(run)) == 1
    ck.point_latest(run / "checkpoints", "step_000009")
    with pytest.raises(FileNotFoundError, match=r"step_000009.*not a complete checkpoint"):
        ck.latest_checkpoint(run)


def test_config_fingerprint_ignores_only_resumable_keys() -> None:
    base = load_config(None, ["train.steps=10"])
    longer = load_config(None, ["train.steps=20", "train.checkpoint_every=5", "rl.micro_batch_tokens=2048"])
    assert ck.config_fingerprint(base) == ck.config_fingerprint(longer)
    assert ck.config_differences(base, longer) == []
    other = load_config(None, ["rl.group_size=4", "optim.lr=1e-5"])
    assert ck.config_fingerprint(base) != ck.config_fingerprint(other)
    assert ck.config_differences(base, other) == ["optim.lr: 1e-06 -> 1e-05", "rl.group_size: 8 -> 4"]


def test_rng_state_roundtrip() -> None:
    state = ck.rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    ck.set_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_lora_checkpoint_reload_and_merge(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok, opt, sched = _setup(tiny_model_dir, lora=True)
    _step(model, opt, sched)
    _step(model, opt, sched)  # B != 0 now: the adapter changes the outputs
    path = ck.save_checkpoint(
        tmp_path / "run",
        2,
        model,
        tok,
        opt,
        sched,
        {"fingerprint": "x"},
        keep_last=1,
        model_name=str(tiny_model_dir),
    )
    assert (path / "adapter_model.safetensors").is_file() and not (path / "model.safetensors").exists()
    meta = (path / "meta.json").read_text()
    assert '"weights": "lora_adapter"' in meta and "memtrain export" in meta
    x = torch.arange(3, 30)[None]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        with model.disable_adapter():
            base_logits = model(input_ids=x).logits
    assert not torch.allclose(expected, base_logits, atol=1e-5)

    fresh, _, _, _ = _setup(tiny_model_dir, lora=True)
    ck.load_adapter_weights(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=x).logits, expected, atol=1e-6)

    merged_dir = merge_lora(path, tmp_path / "merged")
    merged = load_policy(str(merged_dir), "float32", "cpu")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="not a LoRA checkpoint"):
        merge_lora(merged_dir, tmp_path / "again")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        merge_lora(path, tmp_path / "busy")
