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
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol

from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger
from memtrain.retrieval.corpus import PassageStore

RETRIEVER_META = "retriever.json"
INDEX_SUBDIR = "index"
MAX_K = 100
MAX_QUERIES = 256
MAX_QUERY_CHARS = 4096
MAX_BODY_BYTES = 1 << 20


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
        raise ValueError("field 'queries': expected a non-empty list of strings")
    if len(queries) > MAX_QUERIES:
        raise ValueError(f"field 'queries': {len(queries)} queries in one request; at most {MAX_QUERIES}")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"field 'queries'[{i}]: expected a non-empty string, got {q!r}"[:200])
        if len(q) > MAX_QUERY_CHARS:
            raise ValueError(f"field 'queries'[{i}]: {len(q)} characters; at most {MAX_QUERY_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise ValueError(f"field 'k': expected an integer from 1 to {max_k}, got {k!r}")
    return queries, k


class Retriever:
    """An index over a passage corpus, in process. Searches are serialised (indexes are not thread-safe)."""

    def __init__(self, index: Any, store: PassageStore, kind: str, max_k: int = MAX_K):
        if len(index) != len(store):
            raise ValueError(f"index holds {len(index)} passages but the corpus {store.corpus} has "
                             f"{len(store)}; rebuild the index")
        self.index = index
        self.store = store
        self.kind = kind
        self.max_k = max_k
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    @classmethod
    def build(cls, corpus: str | Path, index_dir: str | Path, kind: Literal["bm25", "dense"] = "bm25",
              embedder: str = "minilm") -> Retriever:
        """Index ``corpus`` once and save everything to ``index_dir`` (atomically), then open it."""
        from memtrain.retrieval.index import build_index

        kwargs: dict[str, Any] = {"model": embedder} if kind == "dense" else {}
        with atomic_dir(Path(index_dir)) as tmp:
            store, texts = PassageStore.build(corpus, tmp)
            logger.info("retriever: indexing %d passages of %s (%s)", len(texts), corpus, kind)
            index = build_index(kind, texts, **kwargs)
            del texts
            index.save(tmp / INDEX_SUBDIR)
            atomic_write_json(tmp / RETRIEVER_META, {"kind": kind, "passages": len(store),
                                                     "corpus": str(Path(corpus).resolve()),
                                                     **({"embedder": embedder} if kind == "dense" else {})})
            store.close()
        return cls.open(index_dir)

    @classmethod
    def open(cls, index_dir: str | Path, corpus: str | Path | None = None) -> Retriever:
        """Load a saved index directory (memory-mapped); ``corpus`` overrides the recorded corpus path."""
        from memtrain.retrieval.index import load_index

        index_dir = Path(index_dir)
        meta_path = index_dir / RETRIEVER_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{index_dir}: no {RETRIEVER_META}; not a retriever index dir (build "
                                    "one with `memtrain serve-retriever --corpus FILE --index DIR`)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        store = PassageStore.load(index_dir, corpus)
        return cls(load_index(index_dir / INDEX_SUBDIR), store, str(meta["kind"]))

    @classmethod
    def for_corpus(cls, corpus: str | Path, index_dir: str | Path | None = None,
                   kind: Literal["bm25", "dense"] = "bm25", embedder: str = "minilm") -> Retriever:
        """Open the index of ``corpus`` in ``index_dir`` (default: memtrain's cache); build it if absent."""
        corpus = Path(corpus)
        if index_dir is None:
            index_dir = default_index_dir(corpus, kind, embedder)
        index_dir = Path(index_dir)
        if (index_dir / RETRIEVER_META).is_file():
            meta = json.loads((index_dir / RETRIEVER_META).read_text(encoding="utf-8"))
            if meta.get("kind") != kind:
                raise ValueError(f"{index_dir} holds a {meta.get('kind')!r} index, not {kind!r}; choose "
                                 "another --index directory")
            logger.info("retriever: loading the %s index in %s", kind, index_dir)
            return cls.open(index_dir, corpus)
        return cls.build(corpus, index_dir, kind, embedder)

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
        return {"status": "ok", "kind": self.kind, "passages": len(self), "max_k": self.max_k}


def default_index_dir(corpus: Path, kind: str, embedder: str = "minilm") -> Path:
    """Cache location of a corpus's index, keyed by its resolved path, size and mtime (a changed file gets
    a new index rather than a stale one)."""
    from memtrain.assets import home

    st = corpus.stat()
    key = f"{corpus.resolve()}:{st.st_size}:{st.st_mtime_ns}:{kind}:{embedder if kind == 'dense' else ''}"
    return home() / "retrievers" / f"{corpus.stem}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class RetrieverClient:
    """The HTTP retriever service, behind the same ``search`` as ``Retriever``."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s)

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
            raise RetrieverError(f"retriever {self.url}{path}: HTTP {resp.status_code}: "
                                 f"{data.get('error', data)}")
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
                   kind: Literal["bm25", "dense"] = "bm25", embedder: str = "minilm",
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


class _Handler(BaseHTTPRequestHandler):
    server: RetrieverServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("retriever %s - %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
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

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._reply(200, self.server.retriever.health())
        elif self.path.split("?")[0] == "/search":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED,
                        "use POST /search with a JSON body {\"queries\": [...], \"k\": 3}")
        else:
            self._error(HTTPStatus.NOT_FOUND,
                        f"no endpoint {self.path!r}; expected GET /health or POST /search")

    def do_POST(self) -> None:
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
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({exc})")
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


class RetrieverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8001,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.retriever = retriever
        self.max_body_bytes = max_body_bytes
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
