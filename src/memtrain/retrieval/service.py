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

The server (``memtrain.retrieval.server``: Starlette on uvicorn) batches concurrent searches into few index
calls and is safe to leave running: bounded queue (503 when full), deadlines for idle and slow sockets,
malformed input of any kind answered with a JSON 4xx, and with a token (``--token`` or
``MEMTRAIN_RETRIEVER_TOKEN``) every request needs ``Authorization: Bearer TOKEN``; the client sends the
token from that variable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import threading
from dataclasses import asdict, dataclass
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
              shard_size: int = 100_000, only: range | None = None, *, nprobe: int | None = None,
              ef_search: int | None = None, rerank: int = 10, **params: Any) -> Retriever | None:
        """Index ``corpus`` once and save everything to ``index_dir`` (atomically), then open it (with the
        search settings of :meth:`open`).

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
        return cls.open(index_dir, corpus, nprobe=nprobe, ef_search=ef_search, rerank=rerank)

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
                   nprobe: int | None = None, ef_search: int | None = None, **params: Any) -> Retriever:
        """Open the index of ``corpus`` in ``index_dir`` (default: memtrain's cache), with the search settings
        of :meth:`open`; build it if absent."""
        corpus = Path(corpus)
        if index_dir is None:
            index_dir = default_index_dir(corpus, kind, embedder)
        index_dir = Path(index_dir)
        if not (index_dir / RETRIEVER_META).is_file():  # built, then opened once
            built = cls.build(corpus, index_dir, kind, embedder, shard_size, nprobe=nprobe,
                              ef_search=ef_search, rerank=rerank, **params)
            assert built is not None  # None only for a partial build (``only``)
            return built
        try:
            meta = json.loads((index_dir / RETRIEVER_META).read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise UserError(f"{index_dir / RETRIEVER_META}: damaged retriever index cache "
                            f"({exc.__class__.__name__}: {exc}); delete {index_dir} to rebuild it") from exc
        if meta.get("kind") != kind:
            raise UserError(f"{index_dir} holds a {meta.get('kind')!r} index, not {kind!r}; choose "
                            "another --index directory")
        logger.info("retriever: loading the %s index in %s", kind, index_dir)
        return cls.open(index_dir, corpus, nprobe=nprobe, ef_search=ef_search, rerank=rerank)

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


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the service to this machine only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
