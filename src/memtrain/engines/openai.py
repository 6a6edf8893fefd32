"""Generation through any OpenAI-compatible server (vLLM, SGLang, ...) over ``/v1/completions``.

What we send (one HTTP request per ``GenerationRequest``, at most ``max_concurrency`` in flight):
``model``, ``prompt`` (the token ids when a tokenizer is given or the request has no text - so the server
sees exactly the tokens the trainer scores - else ``prompt_text``), ``n``, ``temperature``, ``top_p``,
``max_tokens``, ``stop``, ``seed`` and ``logprobs=1`` (the completions API then returns, per generated
token, its log-prob in ``choices[i].logprobs.token_logprobs``).

vLLM extensions we rely on when ``vllm_extras`` is on (the default; a server that does not know them must
ignore them, as vLLM and SGLang do with unknown fields, else turn ``vllm_extras`` off):

* ``return_token_ids: true`` -> ``choices[i].token_ids``, the generated ids (vLLM >= 0.10.2);
* ``return_tokens_as_token_ids: true`` -> ``logprobs.tokens`` are strings ``"token_id:123"`` (older vLLM),
  parsed when ``token_ids`` is absent;
* ``skip_special_tokens: true`` so that ``text`` has no ``<|im_end|>``, like the hf engine.

vLLM semantics that match :mod:`memtrain.engines.hf`: the EOS token that ended a completion is part of the
generated ids (and has a log-prob) but not of the text; a stop string is cut from the text (vLLM default
``include_stop_str_in_output=false``) while the ids keep every sampled token.

Log-probs: ``Completion.logprobs`` should be those of the sampling distribution (``memtrain.engines.base``).
Which ones the server returns is a SERVER setting, not a request field: vLLM's engine argument
``--logprobs-mode`` defaults to ``raw_logprobs`` (log_softmax of the raw logits, before temperature and
top-p), which is the sampling distribution only at temperature 1 and top_p 1; start the server with
``--logprobs-mode processed_logprobs`` (after temperature, penalties and top-k/top-p) to get it at any
setting. We pass the values through unchanged and cannot tell the two apart. memtrain's own trainer does
not train from this engine; a consumer that does must recompute them (the trainer's ``rl.old_logprobs=auto``
compares the sampler's with its recomputed log-probs and falls back to the recomputed ones, with a
warning, when they differ by more than ``rl.old_logprob_tol``).

When a server returns no token ids at all, the text is re-tokenized with the tokenizer (an EOS id is
appended when the server says it stopped at EOS); those ids may differ from what the server sampled, so
the log-probs are then approximate: kept when their count matches the re-tokenized ids, else NaN (the
trainer must not use such completions; evaluation only needs the text).

Transient failures (HTTP 429 and 5xx, timeouts, refused or dropped connections) are retried with
exponential back-off and jitter; the rest fail at once with a one-line :class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import random
import re
from typing import Any
from urllib.parse import urlsplit

import httpx

from memtrain.config import EngineConfig
from memtrain.engines.base import Completion, GenerationRequest
from memtrain.engines.checks import validate_requests
from memtrain.engines.registry import register_engine
from memtrain.errors import UserError
from memtrain.log import logger

_TOKEN_ID_PREFIX = "token_id:"


class EngineError(RuntimeError):
    """The server could not produce completions: unreachable, wrong model, rejected request, bad reply."""


def normalize_base_url(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1/`` -> ``http://host:8000/v1``."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"engine.base_url {base_url!r}: expected an http(s) URL such as http://localhost:8000/v1")
    return url if url.endswith("/v1") else url + "/v1"


def _one_line(text: str, limit: int = 300) -> str:
    """The server's error message (``error.message`` of a JSON body, else the raw body) on one short line."""
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            err = body.get("error", body)
            text = str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


class OpenAIEngine:
    """The :class:`~memtrain.engines.base.Engine` over an OpenAI-compatible HTTP server.

    The API key is read only from the environment variable ``api_key_env`` (sent as a Bearer token when
    set). ``retries`` counts the retried attempts so far, for logs and tests.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 32, timeout_s: float = 600.0, max_retries: int = 5,
                 tokenizer: Any = None, *,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, vllm_extras: bool = True) -> None:
        if max_concurrency < 1:
            raise ValueError(f"OpenAIEngine max_concurrency={max_concurrency}; expected >= 1")
        if max_retries < 0:
            raise ValueError(f"OpenAIEngine max_retries={max_retries}; expected >= 0")
        if timeout_s <= 0:
            raise ValueError(f"OpenAIEngine timeout_s={timeout_s}; expected > 0")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.tokenizer = tokenizer
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.vllm_extras = vllm_extras
        self.retries = 0
        self._warned_inexact = False

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Synchronous entry point: runs the async client on its own event loop (in a worker thread when
        the caller is already inside a running loop, e.g. a notebook)."""
        validate_requests(requests, text_prompt_ok=self.tokenizer is None)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(requests)).result()

    async def agenerate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """All requests concurrently (at most ``max_concurrency``); the first fatal error cancels the rest."""
        headers = self.headers()
        semaphore = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency,
                              max_keepalive_connections=self.max_concurrency)
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
            tasks = [asyncio.create_task(self._complete(client, semaphore, i, r))
                     for i, r in enumerate(requests)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def headers(self) -> dict[str, str]:
        """JSON, and the API key of ``api_key_env`` as a Bearer token when it is set."""
        key = os.environ.get(self.api_key_env)
        return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of the ``/v1/completions`` call for one request."""
        p = request.params
        send_ids = self.tokenizer is not None or not request.prompt_text
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(request.prompt_ids) if send_ids else request.prompt_text,
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "logprobs": 1,
            "stream": False,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if self.vllm_extras:
            body.update(return_token_ids=True, return_tokens_as_token_ids=True, skip_special_tokens=True)
        return body

    async def _complete(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, index: int,
                        request: GenerationRequest) -> list[Completion]:
        async with semaphore:
            reply = await self._post(client, "/completions", self.request_body(request))
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != request.params.n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise EngineError(f"server at {self.base_url} answered request {index} with {got} choices; "
                              f"expected n={request.params.n}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [self.parse_choice(c, index) for c in choices]

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
        """POST with retries on transient failures; raise a one-line EngineError otherwise."""
        url = self.base_url + path
        failure = ""
        reachable = False
        retry_after: float | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(self.backoff(attempt, retry_after))
            retry_after = None
            try:
                response = await client.post(url, json=body)
            except httpx.TimeoutException as exc:
                failure = f"{type(exc).__name__}: no answer within timeout_s={self.timeout_s:g}"
                reachable = reachable or not isinstance(exc, httpx.ConnectTimeout)
                continue
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reachable = reachable or not isinstance(exc, httpx.ConnectError)
                continue
            reachable = True
            code = response.status_code
            if code == 429 or code >= 500:
                failure = f"HTTP {code}: {_one_line(response.text)}"
                with contextlib.suppress(ValueError):
                    retry_after = float(response.headers.get("Retry-After", ""))
                continue
            if code >= 400:
                raise await self._client_error(client, code, _one_line(response.text))
            try:
                return response.json()
            except ValueError:
                raise EngineError(f"server at {url} answered HTTP {code} with a body that is not JSON: "
                                  f"{_one_line(response.text, 120)!r}") from None
        attempts = self.max_retries + 1
        if not reachable:
            raise EngineError(f"cannot reach OpenAI-compatible server at {self.base_url}: {failure} (gave up "
                              f"after {attempts} attempts; is the server running? check engine.base_url)")
        raise EngineError(f"OpenAI-compatible server at {self.base_url} kept failing: {failure} "
                          f"(gave up after {attempts} attempts)")

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): exponential with jitter, capped at
        ``max_backoff_s``; a server's Retry-After (also capped) wins."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    async def _client_error(self, client: httpx.AsyncClient, code: int, message: str) -> EngineError:
        """A 4xx answer: explain a wrong model name (listing the served ones), a bad key, or the rejection."""
        if code in (401, 403):
            return EngineError(f"server at {self.base_url} refused the request (HTTP {code}: {message}); "
                               f"set the API key in the environment variable {self.api_key_env}")
        if code == 404 or "model" in message.lower():
            served = await self._served_models(client)
            if served is None:
                return EngineError(f"HTTP {code} from {self.base_url}/completions ({message}) and no "
                                   f"model list at {self.base_url}/models: is engine.base_url an "
                                   "OpenAI-compatible API?")
            if self.model not in served:
                return EngineError(f"model {self.model!r} is not served at {self.base_url} (HTTP {code}: "
                                   f"{message}); served models: {', '.join(served) or 'none'} "
                                   "(set engine.served_model)")
        return EngineError(f"server at {self.base_url} rejected the request (HTTP {code}): {message}")

    async def _served_models(self, client: httpx.AsyncClient) -> list[str] | None:
        try:
            response = await client.get(self.base_url + "/models", timeout=min(self.timeout_s, 30.0))
            data = response.json().get("data") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if not isinstance(data, list):
            return None
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    def parse_choice(self, choice: dict[str, Any], index: int) -> Completion:
        """One ``choices[i]`` object -> Completion with token ids and the sampled tokens' log-probs."""
        where = f"server at {self.base_url}, request {index}, choice {choice.get('index', 0)}"
        finish = choice.get("finish_reason")
        if finish not in ("stop", "length"):
            raise EngineError(f"{where}: finish_reason {finish!r}; expected 'stop' or 'length'")
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        server_lps = [math.nan if v is None else float(v) for v in (lp.get("token_logprobs") or [])]
        ids = choice.get("token_ids")
        as_ids = tokens and all(isinstance(t, str) and t.startswith(_TOKEN_ID_PREFIX) for t in tokens)
        if ids is None and as_ids:
            ids = [int(t[len(_TOKEN_ID_PREFIX):]) for t in tokens]
        if ids is not None:
            ids = [int(i) for i in ids]
            if len(server_lps) != len(ids):
                raise EngineError(f"{where}: {len(ids)} token ids but {len(server_lps)} log-probs; the "
                                  "server must return one log-prob per generated token (we sent logprobs=1)")
            return Completion(token_ids=ids, text=text, logprobs=server_lps, finish_reason=finish)
        if self.tokenizer is None:
            raise EngineError(f"{where}: the reply has no token ids (not a vLLM server, or vllm_extras is "
                              "off); give the engine a tokenizer to re-tokenize the text")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        stopped_at_eos = finish == "stop" and "stop_reason" in choice and choice["stop_reason"] is None
        if stopped_at_eos and eos is not None:  # vLLM's stop_reason is null at EOS, the string/id otherwise
            ids.append(int(eos))
        if not self._warned_inexact:
            logger.warning("server at %s returns no token ids: re-tokenizing its text; token ids and "
                           "log-probs are approximate (use vLLM for training)", self.base_url)
            self._warned_inexact = True
        logprobs = server_lps if len(server_lps) == len(ids) else [math.nan] * len(ids)
        return Completion(token_ids=ids, text=text, logprobs=logprobs, finish_reason=finish)


@register_engine("openai")
def build_openai_engine(cfg: EngineConfig, model_name: str, model: Any, tokenizer: Any) -> OpenAIEngine:
    """Talks to ``cfg.base_url`` serving ``cfg.served_model`` (default ``model_name``); the tokenizer of
    ``model_name`` (loaded when not given) lets it send prompts as token ids."""
    if not cfg.base_url:
        raise UserError("engine.base_url: required when engine.kind is 'openai' "
                        "(e.g. engine.base_url=http://localhost:8000/v1)")
    if tokenizer is None:
        tokenizer = _tokenizer_or_none(model_name)
    return OpenAIEngine(cfg.base_url, cfg.served_model or model_name, api_key_env=cfg.api_key_env,
                        max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s,
                        max_retries=cfg.max_retries, tokenizer=tokenizer, vllm_extras=cfg.vllm_extras)


def _tokenizer_or_none(model_name: str) -> Any:
    """The policy's tokenizer when it can be loaded locally; the server's text is used otherwise."""
    from memtrain.assets import AssetError
    from memtrain.models import load_tokenizer

    try:
        return load_tokenizer(model_name)
    except (AssetError, OSError, ValueError) as exc:
        logger.warning("openai engine: no tokenizer for %r (%s); sending prompt text, token ids come "
                       "from the server", model_name, exc)
        return None
