"""The search agent's retriever: a local library object and a small HTTP service behind one interface.

Both ``Retriever`` (in-process: an index + the passage store) and ``RetrieverClient`` (talks to
``memtrain serve-retriever``) offer ``search(queries, k) -> list[list[Hit]]``, so the search agent, training
and evaluation never care which one they hold; ``open_retriever(spec)`` picks by what the spec is: an
``http(s)://`` URL, an index directory, or a corpus JSONL (a BM25 index is then built once and cached).

Index directory layout (built once, then memory-mapped)::

    retriever.json              {"kind", "passages", "corpus", ...}
    passages.json, passages.offsets.npy   the passage store (``memtrain.retrieval.corpus``)
    index/                      the BM25 or dense index (``memtrain.retrieval.index``)

HTTP API (JSON in, JSON out; every error is a 4xx/5xx with ``{"error": "..."}``)::

    GET  /health                         -> {"status": "ok", "kind": "bm25", "passages": N, "max_k": ...}
    POST /search {"queries": [..], "k": 3} -> {"results": [[{"id", "title", "text", "score"}, ...], ...]}

The server is safe to leave running: a fixed pool of worker threads serves connections (more waiting ones
than ``backlog`` get 503), every request must arrive within ``timeout_s`` of the server starting to wait for
it (idle and slow sockets are closed), malformed input of any kind is a JSON 4xx, and with a token
(``--token`` or ``MEMTRAIN_RETRIEVER_TOKEN``) every request needs ``Authorization: Bearer TOKEN``; the client
sends the token from that variable.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol

from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger
from memtrain.retrieval import DENSE_STRUCTURE, INDEX_KINDS
from memtrain.retrieval.corpus import PassageStore

RETRIEVER_META = "retriever.json"
INDEX_SUBDIR = "index"
MAX_K = 100
MAX_QUERIES = 256
MAX_QUERY_CHARS = 4096
MAX_BODY_BYTES = 1 << 20
TOKEN_ENV = "MEMTRAIN_RETRIEVER_TOKEN"
DEFAULT_THREADS = 8
DEFAULT_BACKLOG = 64
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchBackend(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Top-``k`` passages per query, best first (possibly fewer when nothing matches)."""
        ...


class RetrieverError(RuntimeError):
    """The retriever service could not answer (unreachable, or it rejected the request)."""


def check_request(queries: Any, k: Any, max_k: int = MAX_K) -> tuple[list[str], int]:
    """Validate a search request (shared by the library and the service, so both reject the same inputs)."""
    if not isinstance(queries, list) or not queries:
        raise UserError("field 'queries': expected a non-empty list of strings")
    if len(queries) > MAX_QUERIES:
        raise UserError(f"field 'queries': {len(queries)} queries in one request; at most {MAX_QUERIES}")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"field 'queries'[{i}]: expected a non-empty string, got {q!r}"[:200])
        if len(q) > MAX_QUERY_CHARS:
            raise UserError(f"field 'queries'[{i}]: {len(q)} characters; at most {MAX_QUERY_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise UserError(f"field 'k': expected an integer from 1 to {max_k}, got {k!r}")
    return queries, k


class Retriever:
    """An index over a passage corpus, in process. Searches are serialised (indexes are not thread-safe)."""

    def __init__(self, index: Any, store: PassageStore, kind: str, max_k: int = MAX_K):
        if len(index) != len(store):
            raise UserError(f"index holds {len(index)} passages but the corpus {store.corpus} has "
                            f"{len(store)}; rebuild the index")
        self.index = index
        self.store = store
        self.kind = kind
        self.max_k = max_k
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    @classmethod
    def build(cls, corpus: str | Path, index_dir: str | Path, kind: str = "bm25", embedder: str = "minilm",
              shard_size: int = 100_000, only: range | None = None, **params: Any) -> Retriever | None:
        """Index ``corpus`` once and save everything to ``index_dir`` (atomically), then open it.

        Dense kinds embed into resumable shards beside it (``INDEX.shards/``, kept: another kind is built
        from them without embedding again). With ``only`` (shard numbers) this process embeds those and
        returns None unless the set is then complete (several processes or machines build one index)."""
        from memtrain.retrieval.embed import embed_in_shards, missing_shards
        from memtrain.retrieval.index import DenseIndex, build_index

        if kind not in INDEX_KINDS:
            raise UserError(f"index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
        index_dir, shards = Path(index_dir), shards_dir(index_dir)
        if kind != "bm25" and only is not None:
            store, texts = PassageStore.build(corpus)
            store.close()
            encoder = DenseIndex(None, embedder, prefixes=params.get("prefixes"))
            embed_in_shards(texts, shards, encoder.passage_encoder(), encoder.embedding_id(), shard_size,
                            only)
            missing = missing_shards(shards)
            if missing:
                logger.info("retriever: shards %s:%s embedded; %d others missing, the index is built by the "
                            "run that completes the set", only.start, only.stop, len(missing))
                return None
        with atomic_dir(index_dir) as tmp:
            store, texts = PassageStore.build(corpus, tmp)
            logger.info("retriever: indexing %d passages of %s (%s)", len(texts), corpus, kind)
            if kind == "bm25":
                index = build_index("bm25", texts)
            else:
                index = DenseIndex.build(texts, model=embedder, structure=DENSE_STRUCTURE[kind],
                                         shards_dir=shards, shard_size=shard_size, **params)
            del texts
            index.save(tmp / INDEX_SUBDIR)
            atomic_write_json(tmp / RETRIEVER_META, {"kind": kind, "passages": len(store),
                                                     "corpus": str(Path(corpus).resolve()),
                                                     **({"embedder": embedder} if kind != "bm25" else {})})
            store.close()
        return cls.open(index_dir)

    @classmethod
    def open(cls, index_dir: str | Path, corpus: str | Path | None = None, nprobe: int | None = None,
             ef_search: int | None = None, rerank: int = 10) -> Retriever:
        """Load a saved index directory (memory-mapped where the index kind allows); ``corpus`` overrides
        the recorded corpus path; ``nprobe``/``ef_search``: the search effort of an approximate index, whose
        ``rerank`` x k candidates are re-ranked exactly from its embedding shards when they are there."""
        from memtrain.retrieval.index import DenseIndex, load_index

        index_dir = Path(index_dir)
        meta_path = index_dir / RETRIEVER_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{index_dir}: no {RETRIEVER_META}; not a retriever index dir (build "
                                    "one with `memtrain serve-retriever --corpus FILE --index DIR`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind = str(meta["kind"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{meta_path}: damaged retriever index ({exc.__class__.__name__}: {exc}); "
                            f"delete {index_dir} to rebuild it") from exc
        store = PassageStore.load(index_dir, corpus)
        try:
            index = load_index(index_dir / INDEX_SUBDIR)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise UserError(f"{index_dir / INDEX_SUBDIR}: damaged retriever index "
                            f"({exc.__class__.__name__}: {str(exc)[:200]}); delete {index_dir} to rebuild it"
                            ) from exc
        if isinstance(index, DenseIndex) and (nprobe or ef_search):
            index.set_search(nprobe, ef_search)
        shards = shards_dir(index_dir)
        if isinstance(index, DenseIndex) and index.structure != "flat" and rerank and shards.is_dir():
            from memtrain.retrieval.embed import ShardVectors, missing_shards

            if not missing_shards(shards):  # exact re-ranking from the embedding shards on disk
                index.rerank_with(ShardVectors(shards), rerank)
        return cls(index, store, kind)

    @classmethod
    def for_corpus(cls, corpus: str | Path, index_dir: str | Path | None = None, kind: str = "bm25",
                   embedder: str = "minilm", shard_size: int = 100_000, rerank: int = 10,
                   **params: Any) -> Retriever:
        """Open the index of ``corpus`` in ``index_dir`` (default: memtrain's cache); build it if absent."""
        corpus = Path(corpus)
        if index_dir is None:
            index_dir = default_index_dir(corpus, kind, embedder)
        index_dir = Path(index_dir)
        if (index_dir / RETRIEVER_META).is_file():
            try:
                meta = json.loads((index_dir / RETRIEVER_META).read_text(encoding="utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise UserError(f"{index_dir / RETRIEVER_META}: damaged retriever index cache "
                                f"({exc.__class__.__name__}: {exc}); delete {index_dir} to rebuild it"
                                ) from exc
            if meta.get("kind") != kind:
                raise UserError(f"{index_dir} holds a {meta.get('kind')!r} index, not {kind!r}; choose "
                                "another --index directory")
            logger.info("retriever: loading the %s index in %s", kind, index_dir)
        else:
            cls.build(corpus, index_dir, kind, embedder, shard_size, **params)
        return cls.open(index_dir, corpus, rerank=rerank)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        queries, k = check_request(queries, k, self.max_k)
        with self._lock:
            hits = self.index.search(list(queries), k)
            out = []
            for row_hits in hits:
                passages = self.store.get([row for row, _ in row_hits])
                out.append([Hit(p.id, p.title, p.text, float(s))
                            for p, (_, s) in zip(passages, row_hits, strict=True)])
        return out

    def health(self) -> dict[str, Any]:
        """What is served: the index kind, its size and (approximate kinds) its structure and recall
        settings (nlist, pq_m, nprobe / hnsw_m, ef_search)."""
        out = {"status": "ok", "kind": self.kind, "passages": len(self), "max_k": self.max_k}
        settings = getattr(self.index, "settings", None)
        return {**out, "index": settings()} if settings is not None else out


def shards_dir(index_dir: str | Path) -> Path:
    """Where a dense index's embedding shards live (beside it, kept after the build)."""
    return Path(f"{index_dir}.shards")


def default_index_dir(corpus: Path, kind: str, embedder: str = "minilm") -> Path:
    """Cache location of a corpus's index, keyed by its resolved path, size and mtime (a changed file gets
    a new index rather than a stale one)."""
    from memtrain.assets import home

    st = corpus.stat()
    key = f"{corpus.resolve()}:{st.st_size}:{st.st_mtime_ns}:{kind}:{embedder if kind == 'dense' else ''}"
    return home() / "retrievers" / f"{corpus.stem}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class RetrieverClient:
    """The HTTP retriever service, behind the same ``search`` as ``Retriever``."""

    def __init__(self, url: str, timeout_s: float = 60.0, token: str | None = None):
        """``token``: the service's bearer token (default: ``$MEMTRAIN_RETRIEVER_TOKEN``, when set)."""
        import httpx

        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            resp = self._client.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise RetrieverError(f"retriever {self.url}: {exc.__class__.__name__}: {exc} (is `memtrain "
                                 "serve-retriever` running there?)") from exc
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text[:200]}
        if resp.status_code != 200:
            hint = f" (set {TOKEN_ENV} to the server's token)" if resp.status_code == 401 else ""
            raise RetrieverError(f"retriever {self.url}{path}: HTTP {resp.status_code}: "
                                 f"{data.get('error', data) if isinstance(data, dict) else data}{hint}")
        return data

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        data = self._call("POST", "/search", {"queries": list(queries), "k": k})
        return [[Hit(str(h["id"]), str(h.get("title", "")), str(h["text"]), float(h["score"])) for h in row]
                for row in data["results"]]

    def close(self) -> None:
        self._client.close()


def open_retriever(spec: str | Path, index_dir: str | Path | None = None,
                   kind: str = "bm25", embedder: str = "minilm",
                   ) -> Retriever | RetrieverClient:
    """URL -> client; directory with an index -> loaded index; JSONL corpus -> cached index (built once)."""
    text = str(spec)
    if text.startswith(("http://", "https://")):
        return RetrieverClient(text)
    path = Path(text)
    if path.is_dir():
        return Retriever.open(path)
    if path.is_file():
        return Retriever.for_corpus(path, index_dir, kind, embedder)
    raise FileNotFoundError(f"--retriever {text!r}: expected the http(s):// URL of `memtrain serve-retriever`"
                            ", an index directory, or a corpus JSONL file")


# ------------------------------------------------------------------------------------------------- server


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the service to this machine only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once ``deadline`` (monotonic) has passed, however slowly bytes trickle in: a
    plain socket timeout restarts with every byte, so one client could hold a worker forever."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: RetrieverServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # the whole next request (idle wait, request line, headers, body) must arrive within timeout_s
        self._reader.deadline = time.monotonic() + self.server.timeout_s
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("retriever %s - %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method, ...) as JSON, never HTML."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an HTTP method the service does not have
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} not allowed; expected " \
                "GET /health or POST /search"
        short = self.responses.get(code, ("error", ""))[0]
        self.log_error("code %d, message %s", code, message or short)
        if self.request_version == "HTTP/0.9":  # an unparsable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        try:
            self._reply(int(code), {"error": message or short}, close=True)
        except OSError:
            self.close_connection = True

    def _reply(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.connection.settimeout(self.server.timeout_s)  # the read deadline may have left little time
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        self._reply(status.value, {"error": message}, close=close)

    def _authorized(self) -> bool:
        """With a server token, every request must carry it (constant-time comparison); else 401."""
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token: send 'Authorization: Bearer "
                    f"TOKEN' (the client reads it from {TOKEN_ENV})", close=True)
        return False

    def _guarded(self, handler: Any) -> None:
        """Run one endpoint; anything it raises becomes a JSON 500, never a dropped connection."""
        if not self._authorized():
            return
        try:
            handler()
        except TimeoutError:
            raise  # http.server closes the connection
        except Exception as exc:
            logger.warning("retriever: %s %s failed: %s: %s", self.command, self.path, exc.__class__.__name__,
                           exc)
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc.__class__.__name__}: {exc}"[:300],
                            close=True)
            except OSError:
                self.close_connection = True

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._reply(200, self.server.retriever.health())
        elif self.path.split("?")[0] == "/search":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED,
                        "use POST /search with a JSON body {\"queries\": [...], \"k\": 3}")
        else:
            self._error(HTTPStatus.NOT_FOUND,
                        f"no endpoint {self.path!r}; expected GET /health or POST /search")

    def _post(self) -> None:
        if self.path.split("?")[0] != "/search":
            self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}; expected POST /search", close=True)
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required", close=True)
            return
        try:
            length = int(raw_length)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw_length!r}", close=True)
            return
        limit = self.server.max_body_bytes
        if length > limit or length < 0:
            # The body is not read: close the connection rather than drain a huge upload.
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"request body of {length} bytes; at most {limit}", close=True)
            return
        raw = self.rfile.read(length)
        if len(raw) < length:
            self._error(HTTPStatus.BAD_REQUEST, f"body ended after {len(raw)} of {length} bytes", close=True)
            return
        try:
            body = json.loads(raw or b"null")
        except RecursionError:
            self._error(HTTPStatus.BAD_REQUEST, "body is not valid JSON (nested too deeply)")
            return
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints of over 4300 digits
            self._error(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({str(exc)[:200]})")
            return
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "body: expected a JSON object {\"queries\": [...], \"k\": 3}")
            return
        unknown = sorted(set(body) - {"queries", "query", "k"})
        if unknown:
            self._error(HTTPStatus.BAD_REQUEST,
                        f"unknown field(s) {unknown}; expected 'queries' (or 'query') and 'k'")
            return
        queries = body.get("queries")
        if queries is None and "query" in body:
            queries = [body["query"]]
        if queries is None:
            self._error(HTTPStatus.BAD_REQUEST,
                        "field 'queries' is missing: expected a non-empty list of strings")
            return
        try:
            queries, k = check_request(queries, body.get("k", 3), self.server.retriever.max_k)
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        try:
            results = self.server.retriever.search(queries, k)
        except Exception as exc:  # the server must answer, not die: report and keep serving
            logger.exception("retriever: search failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"search failed: {exc.__class__.__name__}: {exc}")
            return
        self._reply(200, {"results": [[h.as_dict() for h in row] for row in results]})


class RetrieverServer(HTTPServer):
    """HTTP server over a retriever with a fixed pool of ``threads`` workers (connections beyond ``backlog``
    waiting for one get an immediate 503), a per-request deadline ``timeout_s`` and an optional bearer
    ``token``."""

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8001,
                 max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None,
                 threads: int = DEFAULT_THREADS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 backlog: int = DEFAULT_BACKLOG):
        if threads < 1 or backlog < 1 or timeout_s <= 0:
            raise UserError(f"threads={threads}, backlog={backlog}, timeout_s={timeout_s}: expected "
                            "positive values")
        self.retriever = retriever
        self.max_body_bytes = max_body_bytes
        self.token = token or None
        self.timeout_s = timeout_s
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(maxsize=backlog)
        super().__init__((host, port), _Handler)
        self._workers = [threading.Thread(target=self._work, name=f"retriever-worker-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._workers:
            t.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to the pool; when too many are waiting, answer 503 and close at once."""
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            body = json.dumps({"error": "server busy: too many open connections; retry later"}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                                + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        logger.warning("retriever: connection from %s failed: %s: %s", client_address,
                       exc.__class__.__name__, exc)

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
