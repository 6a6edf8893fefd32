"""OpenAIEngine against a real loopback HTTP server (stdlib ``http.server`` in a thread) that serves
``/v1/completions`` from the tiny model through HFEngine, in vLLM's reply format, and injects failures."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from memtrain.config import EngineConfig
from memtrain.engines import make_engine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.engines.openai import EngineError, OpenAIEngine, normalize_base_url
from memtrain.models import load_policy, load_tokenizer

SERVED = "tiny-served"
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}  # retries without real waiting


@dataclass
class FakeServer:
    """What the handler serves and records. ``faults`` are consumed one per POST: '500', '429', 'drop'
    (close the socket without answering), 'slow' (answer after 1 s), '400'."""

    engine: HFEngine
    tokenizer: Any
    url: str = ""
    id_mode: str = "token_ids"  # 'token_ids' (vLLM >= 0.10.2), 'strings' ("token_id:N" only), 'none'
    faults: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    posts: int = 0
    inflight: int = 0
    max_inflight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    model_lock: threading.Lock = field(default_factory=threading.Lock)

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        ids = (
            prompt
            if isinstance(prompt, list)
            else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        params = SamplingParams(
            n=body["n"],
            temperature=body["temperature"],
            top_p=body["top_p"],
            max_tokens=body["max_tokens"],
            stop=tuple(body.get("stop", ())),
            seed=body.get("seed"),
        )
        with self.model_lock:
            (completions,) = self.engine.generate([GenerationRequest(ids, params)])
        choices = []
        for i, c in enumerate(completions):
            as_ids = body.get("return_tokens_as_token_ids") and self.id_mode in ("token_ids", "strings")
            tokens = [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in c.token_ids]
            choice = {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": c.logprobs,
                    "text_offset": [],
                    "top_logprobs": None,
                },
            }
            if body.get("return_token_ids") and self.id_mode == "token_ids":
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices}


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._finish_request()  # before the first byte: once the client has the reply it may send the next
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        fake: FakeServer = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.posts += 1
            fake.bodies.append(body)
            fake.auth.append(self.headers.get("Authorization"))
            fault = fake.faults.pop(0) if fake.faults else None
            fake.inflight += 1
            fake.max_inflight = max(fake.max_inflight, fake.inflight)
        self._in_flight = True
        try:
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "slow":
                time.sleep(1.0)
            time.sleep(fake.delay_s)
            if fault in ("500", "429"):
                self._send(
                    int(fault),
                    {"error": {"message": "engine overloaded", "code": int(fault)}},
                    {"Retry-After": "0"} if fault == "429" else None,
                )
            elif fault == "400":
                self._send(400, {"error": {"message": "This prompt is too long.\n Really.", "code": 400}})
            elif self.path != "/v1/completions":
                self._send(404, {"detail": "Not Found"})
            elif body.get("model") != SERVED:
                self._send(
                    404,
                    {
                        "error": {
                            "message": f"The model `{body.get('model')}` does not exist.",
                            "type": "NotFoundError",
                            "code": 404,
                        }
                    },
                )
            else:
                self._send(200, fake.completions(body))
        finally:
            self._finish_request()

    def _finish_request(self) -> None:
        """A POST stops counting as in flight when its reply starts (or when it is dropped)."""
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            fake: FakeServer = self.server.fake
            with fake.lock:
                fake.inflight -= 1


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[HFEngine, Any]:
    tok = load_tokenizer(str(tiny_model_dir))
    return HFEngine(load_policy(str(tiny_model_dir), device="cpu"), tok), tok


@pytest.fixture
def server(tiny: tuple[HFEngine, Any]) -> Iterator[FakeServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    fake = FakeServer(*tiny, url=f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    httpd.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _requests(tok: Any, n: int = 1, **params: Any) -> list[GenerationRequest]:
    texts = ["Paris is the capital of", "The memory agent reads a long document chunk by chunk. It"]
    defaults: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6}
    return [
        GenerationRequest(tok(t)["input_ids"], SamplingParams(n=n, **{**defaults, **params}), prompt_text=t)
        for t in texts
    ]


def _engine(server: FakeServer, tok: Any = None, **kwargs: Any) -> OpenAIEngine:
    options = {"max_retries": 3, "timeout_s": 10.0, **FAST, **kwargs}
    return OpenAIEngine(server.url, SERVED, tokenizer=tok, **options)


def test_matches_hf_engine_exactly_and_maps_params(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    hf, tok = tiny
    requests = _requests(tok, n=2, temperature=0.9, top_p=0.8, max_tokens=7, stop=("zz",), seed=5)
    got = _engine(server, tok).generate(requests)
    expected = hf.generate(requests)
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in expected]
    for cs, es in zip(got, expected, strict=True):  # the server batches differently: float rounding only
        for c, e in zip(cs, es, strict=True):
            assert c.logprobs == pytest.approx(e.logprobs, abs=1e-5)
    assert [[(c.text, c.finish_reason) for c in cs] for cs in got] == [
        [(c.text, c.finish_reason) for c in cs] for cs in expected
    ]
    body = server.bodies[0]
    assert body["prompt"] in [r.prompt_ids for r in requests]  # token ids, not text, with a tokenizer
    assert {k: body[k] for k in ("n", "temperature", "top_p", "max_tokens", "stop", "seed", "logprobs")} == {
        "n": 2,
        "temperature": 0.9,
        "top_p": 0.8,
        "max_tokens": 7,
        "stop": ["zz"],
        "seed": 5,
        "logprobs": 1,
    }
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"] and body["model"] == SERVED


def test_token_id_strings_are_parsed(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    hf, tok = tiny
    server.id_mode = "strings"
    requests = _requests(tok)
    got = _engine(server, tok).generate(requests)
    assert [cs[0].token_ids for cs in got] == [cs[0].token_ids for cs in hf.generate(requests)]


def test_without_ids_text_is_retokenized_or_error(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    hf, tok = tiny
    server.id_mode = "none"
    requests = _requests(tok)
    got = _engine(server, tok).generate(requests)
    for (c,), (sampled,) in zip(got, hf.generate(requests), strict=True):
        ids = tok(c.text, add_special_tokens=False)["input_ids"]
        assert c.token_ids == ids and c.text == sampled.text
        if len(ids) == len(sampled.token_ids):  # the server's log-probs, approximately aligned
            assert c.logprobs == pytest.approx(sampled.logprobs, abs=1e-5)
        else:
            assert len(c.logprobs) == len(ids) and all(math.isnan(v) for v in c.logprobs)
    with pytest.raises(EngineError, match="no token ids"):
        _engine(server).generate(requests)


def test_parse_choice_eos_and_bad_replies(tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    engine = OpenAIEngine("http://127.0.0.1:9", SERVED, tokenizer=tok)
    paris = tok("Paris", add_special_tokens=False)["input_ids"]

    def choice(**kw: Any) -> dict[str, Any]:
        lps = [-0.5] * (len(paris) + 1)
        return {
            "index": 0,
            "text": "Paris",
            "finish_reason": "stop",
            "stop_reason": None,
            "logprobs": {"tokens": ["x"] * len(lps), "token_logprobs": lps},
            **kw,
        }

    at_eos = engine.parse_choice(choice(), 0)  # vLLM: stop_reason null = stopped at EOS, which it sampled
    assert at_eos.token_ids == [*paris, tok.eos_token_id] and at_eos.logprobs == [-0.5] * (len(paris) + 1)
    at_stop = engine.parse_choice(choice(stop_reason="\n"), 0)
    assert at_stop.token_ids == paris and all(math.isnan(v) for v in at_stop.logprobs)
    exact = engine.parse_choice(choice(token_ids=[7, 8], logprobs={"token_logprobs": [-1.0, None]}), 0)
    assert exact.token_ids == [7, 8] and exact.logprobs[0] == -1.0 and math.isnan(exact.logprobs[1])
    with pytest.raises(EngineError, match="2 token ids but 1 log-probs"):
        engine.parse_choice(choice(token_ids=[7, 8], logprobs={"token_logprobs": [-1.0]}), 0)
    with pytest.raises(EngineError, match="finish_reason 'abort'"):
        engine.parse_choice(choice(finish_reason="abort"), 0)


def test_text_prompt_without_tokenizer(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    hf, tok = tiny
    requests = _requests(tok)
    got = _engine(server).generate(requests)
    assert sorted(b["prompt"] for b in server.bodies) == sorted(r.prompt_text for r in requests)
    assert [cs[0].token_ids for cs in got] == [cs[0].token_ids for cs in hf.generate(requests)]


@pytest.mark.parametrize("faults", [["500"], ["drop"], ["429", "drop", "500"], ["slow"]])
def test_transient_failures_are_retried(
    server: FakeServer, tiny: tuple[HFEngine, Any], faults: list[str]
) -> None:
    _, tok = tiny
    server.faults = list(faults)
    engine = _engine(server, tok, timeout_s=0.5)
    (completions,) = engine.generate(_requests(tok)[:1])
    assert len(completions[0].token_ids) == 6
    assert engine.retries == len(faults)
    assert server.posts == len(faults) + 1


def test_persistent_server_error_gives_up(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    server.faults = ["500"] * 10
    with pytest.raises(
        EngineError, match=r"kept failing: HTTP 500: engine overloaded \(gave up after 3 attempts"
    ):
        _engine(server, tok, max_retries=2).generate(_requests(tok)[:1])
    assert server.posts == 3


def test_client_error_is_not_retried(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    server.faults = ["400"]
    engine = _engine(server, tok)
    with pytest.raises(EngineError) as info:
        engine.generate(_requests(tok)[:1])
    assert str(info.value).endswith("rejected the request (HTTP 400): This prompt is too long. Really.")
    assert engine.retries == 0 and server.posts == 1


def test_unknown_model_lists_served_models(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    engine = OpenAIEngine(server.url, "no-such-model", tokenizer=tok, **FAST)
    with pytest.raises(EngineError) as info:
        engine.generate(_requests(tok)[:1])
    message = str(info.value)
    assert "model 'no-such-model' is not served at" in message and f"served models: {SERVED}" in message
    assert "\n" not in message and engine.retries == 0


def test_unreachable_server_fails_fast_and_clearly(tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = OpenAIEngine(
        f"http://127.0.0.1:{port}", SERVED, tokenizer=tok, max_retries=2, timeout_s=2.0, **FAST
    )
    start = time.monotonic()
    with pytest.raises(
        EngineError,
        match=rf"^cannot reach OpenAI-compatible server at http://127.0.0.1:{port}/v1: "
        r"ConnectError.*gave up after 3 attempts",
    ):
        engine.generate(_requests(tok)[:1])
    assert time.monotonic() - start < 5
    assert engine.retries == 2


def test_concurrency_is_bounded(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    server.delay_s = 0.1
    requests = _requests(tok, max_tokens=2) * 3
    results = _engine(server, tok, max_concurrency=2).generate(requests)
    assert len(results) == 6 and server.posts == 6
    assert server.max_inflight == 2


def test_api_key_comes_only_from_the_environment(
    server: FakeServer, tiny: tuple[HFEngine, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tok = tiny
    monkeypatch.delenv("MEMTRAIN_TEST_KEY", raising=False)
    _engine(server, tok, api_key_env="MEMTRAIN_TEST_KEY").generate(_requests(tok, max_tokens=1)[:1])
    monkeypatch.setenv("MEMTRAIN_TEST_KEY", "sekrit")
    _engine(server, tok, api_key_env="MEMTRAIN_TEST_KEY").generate(_requests(tok, max_tokens=1)[:1])
    assert server.auth == [None, "Bearer sekrit"]


def test_generate_inside_a_running_event_loop(server: FakeServer, tiny: tuple[HFEngine, Any]) -> None:
    _, tok = tiny
    engine = _engine(server, tok)

    async def caller() -> int:
        return len(engine.generate(_requests(tok, max_tokens=2)))

    assert asyncio.run(caller()) == 2


def test_base_url_normalisation() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ValueError, match=r"engine\.base_url 'localhost:8000'"):
        normalize_base_url("localhost:8000")


def test_make_engine_openai_and_errors(server: FakeServer, tiny_model_dir: Path) -> None:
    cfg = EngineConfig(
        kind="openai", base_url=server.url, served_model=SERVED, max_concurrency=3, max_retries=1
    )
    engine = make_engine(cfg, str(tiny_model_dir))
    assert isinstance(engine, OpenAIEngine)
    assert (engine.model, engine.max_concurrency, engine.max_retries) == (SERVED, 3, 1)
    assert engine.tokenizer is not None
    assert len(engine.generate(_requests(engine.tokenizer, max_tokens=2))[0][0].token_ids) == 2
    with pytest.raises(ValueError, match=r"engine\.base_url: required"):
        make_engine(EngineConfig(kind="openai"), str(tiny_model_dir))
    with pytest.raises(ValueError, match="must be constructed in code"):
        make_engine(EngineConfig(kind="scripted"), str(tiny_model_dir))
