"""``memtrain serve-retriever``'s HTTP service: a Starlette app on uvicorn that batches concurrent searches.

The search agent's rollouts send many small searches at once. One asyncio event loop holds any number of
open connections (idle and slow ones cost a socket, not a thread), and the searches that arrive while the
index is busy, or within ``batch_wait_s`` of the first, are answered by one ``Retriever.search`` per
distinct k, run in a worker thread: results equal separate searches' (tested), at a fraction of the calls.

API (``memtrain.retrieval.service`` describes it): ``GET /health``, ``POST /search``; every error is a JSON
4xx/5xx ``{"error": "..."}``, including those of the HTTP layer (uvicorn's protocol is subclassed for it).

Limits, each answered rather than dropped: a request head must arrive within ``timeout_s`` of the
connection waiting for it and its body within ``timeout_s`` after that (else the connection is closed; a
late body gets 408); bodies over ``max_body_bytes`` get 413; at most ``queue`` requests wait for the index
(more get 503 at once) and ``max_connections`` connections are open (more get 503 and are closed). With a
``token`` every request needs ``Authorization: Bearer TOKEN`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.retrieval.service import MAX_BODY_BYTES, MAX_QUERIES, TOKEN_ENV, Hit, Retriever, check_request

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_QUEUE = 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_BATCH_WAIT_S = 0.001
BACKLOG = 2048  # connections the kernel queues for accepting (a burst of clients connects at once)
ENDPOINTS = "expected GET /health or POST /search"


class _Reject(Exception):
    """A request answered with a JSON error (``close``: the connection is not reused, e.g. a body unread)."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _error(status: int, message: str, close: bool = False, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    extra = {**(headers or {}), **({"Connection": "close"} if close else {})}
    return JSONResponse({"error": message}, status_code=status, headers=extra or None)


@dataclass
class _Waiting:
    queries: list[str]
    k: int
    future: asyncio.Future[list[list[Hit]]]


class Batcher:
    """Concurrent searches -> few index calls. Requests wait in a bounded queue; one worker thread runs one
    batch at a time (indexes are not thread-safe): the requests queued meanwhile, up to ``max_batch``
    queries, form the next batch, one ``Retriever.search`` per distinct k (so each gets exactly what a
    search of its own would: a larger k can change an approximate index's candidates)."""

    def __init__(self, retriever: Retriever, max_batch: int = MAX_QUERIES, queue: int = DEFAULT_QUEUE,
                 wait_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        self.retriever, self.max_batch, self.queue, self.wait_s = retriever, max_batch, queue, wait_s
        self._waiting: deque[_Waiting] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.requests = self.searches = self.busy = 0  # served, index calls made, turned away (503)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="retriever-search")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def waiting(self) -> int:
        """Requests queued for the index (not counting the batch being searched)."""
        return len(self._waiting)

    async def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The hits of validated ``queries``; raises ``_Reject`` (503) when the queue is full."""
        if self._wake is None:
            raise RuntimeError("the batcher is not started")
        if len(self._waiting) >= self.queue:
            self.busy += 1
            raise _Reject(503, f"server busy: {self.queue} requests are waiting for the index; retry later")
        future: asyncio.Future[list[list[Hit]]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(queries, k, future))
        self._wake.set()
        return await future

    def _take(self) -> list[_Waiting]:
        batch = [self._waiting.popleft()]
        size = len(batch[0].queries)
        while self._waiting and size + len(self._waiting[0].queries) <= self.max_batch:
            size += len(self._waiting[0].queries)
            batch.append(self._waiting.popleft())
        return batch

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s > 0:  # the index was idle: let a burst's other requests join the first
                await asyncio.sleep(self.wait_s)
            while self._waiting:  # what queued during a search is the next batch, without waiting more
                groups: dict[int, list[_Waiting]] = {}
                for waiting in self._take():
                    groups.setdefault(waiting.k, []).append(waiting)
                for k, group in groups.items():
                    await self._search(group, k)

    async def _search(self, group: list[_Waiting], k: int) -> None:
        queries = [q for waiting in group for q in waiting.queries]
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self._executor, self.retriever.search, queries, k)
        except Exception as exc:  # every request of the batch is told; the server keeps serving
            logger.warning("retriever: search of %d queries failed: %s: %s", len(queries),
                           exc.__class__.__name__, exc)
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        self.searches += 1
        start = 0
        for waiting in group:
            if not waiting.future.done():  # cancelled when its client went away
                waiting.future.set_result(rows[start:start + len(waiting.queries)])
                self.requests += 1
            start += len(waiting.queries)


def _parse_search(raw: bytes, max_k: int) -> tuple[list[str], int]:
    """The (queries, k) of a /search body, or ``_Reject`` (400) saying what is wrong in one line."""
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise _Reject(400, "body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints of over 4300 digits
        raise _Reject(400, f"body is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(body, dict):
        raise _Reject(400, "body: expected a JSON object {\"queries\": [...], \"k\": 3}")
    unknown = sorted(set(body) - {"queries", "query", "k"})
    if unknown:
        raise _Reject(400, f"unknown field(s) {unknown}; expected 'queries' (or 'query') and 'k'")
    queries = body.get("queries")
    if queries is None and "query" in body:
        queries = [body["query"]]
    if queries is None:
        raise _Reject(400, "field 'queries' is missing: expected a non-empty list of strings")
    try:
        return check_request(queries, body.get("k", 3), max_k)
    except ValueError as exc:
        raise _Reject(400, str(exc)) from None


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused unread past ``limit`` bytes (413) and cut when not received within ``timeout_s``
    (408: a client trickling bytes must not hold the request open)."""
    declared = request.headers.get("content-length")  # h11 has checked that it is a number
    if declared is not None and int(declared) > limit:
        raise _Reject(413, f"request body of {declared} bytes; at most {limit}", close=True)

    async def collect() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _Reject(413, f"request body over {limit} bytes", close=True)
        return bytes(data)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise _Reject(408, f"request body not received within {timeout_s:g} s", close=True) from None
    except ClientDisconnect:
        raise _Reject(400, "the client closed the connection during the body", close=True) from None


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Run one endpoint; a ``_Reject`` becomes its JSON error, anything else a JSON 500 (one log line)."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except _Reject as exc:
            return _error(exc.status, exc.message, close=exc.close)
        except Exception as exc:
            logger.warning("retriever: %s %s failed: %s: %s", request.method, request.url.path,
                           exc.__class__.__name__, exc)
            return _error(500, f"{exc.__class__.__name__}: {exc}"[:300], close=True)

    return run


class _BearerAuth:
    """With a token, every HTTP request must carry ``Authorization: Bearer TOKEN`` (constant-time
    comparison), unknown paths included; else 401 and the connection is closed."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, (token or "").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, value = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)):
                response = _error(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
                                  f"(the client reads it from {TOKEN_ENV})", close=True)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (no such route or method), as JSON with what to send instead."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    path = request.url.path
    if status == 405 and path == "/search":
        message = (f"method {request.method!r} not allowed on /search: use POST /search with a JSON body "
                   "{\"queries\": [...], \"k\": 3}")
    elif status == 405:
        message = f"method {request.method!r} not allowed; {ENDPOINTS}"
    elif status == 404:
        message = f"no endpoint {path!r}; {ENDPOINTS}"
    else:
        message = str(getattr(exc, "detail", exc))[:300]
    return _error(status, message, close=status >= 500, headers=headers)


def create_app(retriever: Retriever, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               timeout_s: float = DEFAULT_TIMEOUT_S, queue: int = DEFAULT_QUEUE, max_batch: int = MAX_QUERIES,
               batch_wait_s: float = DEFAULT_BATCH_WAIT_S) -> Starlette:
    """The ASGI app of the service (its ``state.batcher`` counts requests, index calls and 503s)."""
    batcher = Batcher(retriever, max_batch, queue, batch_wait_s)

    @_guarded
    async def health(request: Request) -> Response:
        return JSONResponse(retriever.health())

    @_guarded
    async def search(request: Request) -> Response:
        queries, k = _parse_search(await _read_body(request, max_body_bytes, timeout_s), retriever.max_k)
        rows = await batcher.search(queries, k)
        return JSONResponse({"results": [[h.as_dict() for h in row] for row in rows]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    routes = [Route("/health", health, methods=["GET"]), Route("/search", search, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(_BearerAuth, token=token)], lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _http_error})
    app.state.batcher = batcher
    return app


def _json_response(status: int, reason: bytes, message: str) -> tuple[h11.Response, bytes]:
    """A JSON error the protocol answers itself (a request uvicorn cannot parse); the connection closes."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return h11.Response(status_code=status, headers=headers, reason=reason), body


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus what a server facing untrusted clients needs and uvicorn (0.55) does
    not do: a deadline on each request head (uvicorn waits forever for a connection's first request and for
    a head sent a byte at a time), a cap on open connections, and JSON for the errors it answers itself."""

    head_timeout_s: float = DEFAULT_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # headers and body are separate writes: without this, each response waits out a 40 ms delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) > self.max_connections:
            body = json.dumps({"error": "server busy: too many open connections; retry later"}).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Armed while the connection waits for a request head (from the first byte it waits for: trickled
        bytes do not extend it), disarmed once the head is in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._deadline is None:
            self._deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        elif not waiting and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        response, body = _json_response(400, b"Bad Request",
                                        "Bad request: not valid HTTP/1.1 (request line, headers or framing)")
        self.transport.write(self.conn.send(response) + self.conn.send(h11.Data(data=body))  # type: ignore[operator]
                             + self.conn.send(h11.EndOfMessage()))  # type: ignore[operator]
        self.transport.close()


def _bind(host: str, port: int) -> socket.socket:
    family, _, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)  # connections made before uvicorn starts accepting wait instead of failing
    except OSError:
        sock.close()
        raise
    return sock


class RetrieverServer:
    """The service over ``retriever`` on uvicorn, in this process: ``serve_forever()`` (the CLI; Ctrl-C
    stops it) or ``start()`` / ``stop()`` around a background thread (tests, benchmarks; also a context
    manager). The socket is bound and listening from here on, so a taken port fails at once, ``port=0`` has
    its number, and clients may connect before serving starts."""

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8001,
                 max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, queue: int = DEFAULT_QUEUE,
                 max_batch: int = MAX_QUERIES, batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if (timeout_s <= 0 or queue < 1 or max_connections < 1 or batch_wait_s < 0
                or not 1 <= max_batch <= MAX_QUERIES):
            raise UserError(f"timeout_s={timeout_s}, queue={queue}, max_connections={max_connections}, "
                            f"batch_wait_s={batch_wait_s}, max_batch={max_batch}: expected positive values "
                            f"(batch_wait_s may be 0, max_batch at most {MAX_QUERIES})")
        self.retriever = retriever
        self.app = create_app(retriever, token or None, max_body_bytes, timeout_s, queue, max_batch,
                              batch_wait_s)
        self._sock = _bind(host, port)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        protocol = type("RetrieverProtocol", (_Protocol,),
                        {"head_timeout_s": timeout_s, "max_connections": max_connections})
        config = uvicorn.Config(self.app, http=protocol, ws="none", lifespan="on", log_config=None,
                                log_level="warning", access_log=False, server_header=False,
                                timeout_keep_alive=int(timeout_s) or 1,
                                timeout_graceful_shutdown=5, backlog=BACKLOG)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def batcher(self) -> Batcher:
        return self.app.state.batcher

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or ``stop()``."""
        self._server.run(sockets=[self._sock])

    def start(self, timeout_s: float = 60.0) -> RetrieverServer:
        """Serve from a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="retriever-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the retriever server on {self.url} did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (open requests are answered first) and release the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> RetrieverServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
