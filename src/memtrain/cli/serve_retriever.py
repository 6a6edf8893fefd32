"""``memtrain serve-retriever``: the search agent's retriever as a local HTTP service.

The index is built on first use (BM25 by default, dense with ``--kind dense``) and saved in ``--index``;
later starts memory-map it. API: ``GET /health``, ``POST /search {"queries": [...], "k": 3}``, served by
Starlette on uvicorn with concurrent searches batched (``memtrain.retrieval.server``).

Bound beyond localhost, set a token (``MEMTRAIN_RETRIEVER_TOKEN``, or ``--token``): requests then need
``Authorization: Bearer TOKEN``, which memtrain's client sends from the same variable.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from memtrain.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-retriever", help="serve BM25/dense search over a wiki-18 style corpus (HTTP)",
                       description="Builds (once) and serves an index of --corpus; POST /search "
                       "{\"queries\": [...], \"k\": 3} returns id/title/text/score per hit.")
    p.add_argument("--corpus", type=Path,
                   help="passage JSONL, one {\"id\", \"contents\"} per line (wiki-18 layout); optional when "
                   "--index already holds an index (its recorded corpus is used)")
    p.add_argument("--index", type=Path, required=True, help="index directory (built there when absent)")
    _index_options(p)
    p.add_argument("--nprobe", type=int, default=None,
                   help="ivf-*: inverted lists searched per query (default: the index's, 32); more = higher "
                   "recall, slower")
    p.add_argument("--ef-search", type=int, default=None,
                   help="hnsw: candidates kept per query (default: the index's, 128)")
    p.add_argument("--rerank", type=int, default=10,
                   help="approximate kinds: re-rank N x k candidates by their exact vectors, read from the "
                   "embedding shards on disk (default 10; 0: the compressed scores alone)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001; 0 = any free port)")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB)")
    p.add_argument("--token", default=None,
                   help="bearer token every request must carry (default: $MEMTRAIN_RETRIEVER_TOKEN; prefer "
                   "the variable, a command line is visible to other users); set one when --host is not "
                   "loopback")
    p.add_argument("--queue", type=int, default=1024, metavar="N",
                   help="requests that may wait for the index; more get 503 at once (default 1024)")
    p.add_argument("--batch-wait", type=float, default=1.0, metavar="MS",
                   help="when the index is idle, wait this long for concurrent searches to join one index "
                   "call (default 1 ms; searches that arrive while it is busy join the next call anyway)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections; more get 503 and are closed (default 1024)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's head, and then its body, must arrive within this long, else its "
                   "connection is closed (default 30)")
    p.set_defaults(func=_serve)

    b = sub.add_parser("build-index", help="build a retriever index (resumable; shards over processes)",
                       description="Builds the index serve-retriever serves. Dense kinds embed into "
                       "INDEX.shards/ shard by shard: a killed build resumes at the first missing shard, and "
                       "--shards A:B lets several processes or machines embed parts of one set.")
    b.add_argument("--corpus", type=Path, required=True,
                   help="passage JSONL, one {\"id\", \"contents\"} per line")
    b.add_argument("--index", type=Path, required=True, help="index directory to write")
    _index_options(b)
    b.add_argument("--shards", default=None, metavar="A:B",
                   help="embed only shards A..B-1 (the index is built by the run that completes the set)")
    b.set_defaults(func=_build)


def _index_options(p: argparse.ArgumentParser) -> None:
    from memtrain.retrieval import INDEX_KINDS

    p.add_argument("--kind", choices=INDEX_KINDS, default="bm25",
                   help="bm25 (default); dense (exact, flat); ivf-flat, ivf-pq (pq_m bytes a passage), hnsw: "
                   "approximate, for corpora whose flat index does not fit in memory (docs/retrieval.md)")
    p.add_argument("--embedder", default="minilm",
                   help="sentence-transformers model for the dense kinds (default minilm, embedded)")
    p.add_argument("--shard-size", type=int, default=100_000, help="passages per embedding shard")
    p.add_argument("--nlist", type=int, default=None, help="ivf-*: inverted lists (default ~4 sqrt(N))")
    p.add_argument("--pq-m", type=int, default=None, help="ivf-pq: bytes per passage (default dim / 8)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph neighbours per passage (default 32)")
    p.add_argument("--query-prefix", default=None,
                   help="text prepended to queries before embedding (default by embedder: 'query: ' for e5, "
                   "bge's search instruction for English bge, else none)")
    p.add_argument("--passage-prefix", default=None,
                   help="text prepended to passages before embedding (default: 'passage: ' for e5, else "
                   "none)")


def _build_params(args: argparse.Namespace) -> dict:
    params = {k: v for k, v in (("nlist", args.nlist), ("pq_m", args.pq_m), ("hnsw_m", args.hnsw_m)) if v}
    if args.query_prefix is not None or args.passage_prefix is not None:
        from memtrain.retrieval.index import default_prefixes

        query, passage = default_prefixes(args.embedder)
        params["prefixes"] = (args.query_prefix if args.query_prefix is not None else query,
                              args.passage_prefix if args.passage_prefix is not None else passage)
    return params


def _build(args: argparse.Namespace) -> int:
    from memtrain.retrieval.service import Retriever

    only = None
    if args.shards is not None:
        try:
            a, b = (int(x) for x in args.shards.split(":"))
        except ValueError:
            raise UserError(f"--shards {args.shards!r}: expected A:B, two shard numbers") from None
        only = range(a, b)
    retriever = Retriever.build(args.corpus, args.index, args.kind, args.embedder, args.shard_size, only,
                                **_build_params(args))
    if retriever is not None:
        print(f"index: {args.index} ({retriever.health()})")
    return 0


def _bind_error(host: str, port: int, exc: OSError) -> UserError:
    from memtrain.cli.main import os_error_line

    return UserError(f"--host {host} --port {port}: cannot serve there: {os_error_line(exc)}")


def check_bindable(host: str, port: int) -> None:
    """Bind (and release) ``host:port`` the way the server will, so that a port in use or a bad host fails
    in one line before the index is loaded or built (minutes for a large corpus)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            sock.bind(address)
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc


def _serve(args: argparse.Namespace) -> int:
    from memtrain.log import logger
    from memtrain.retrieval.server import RetrieverServer
    from memtrain.retrieval.service import RETRIEVER_META, TOKEN_ENV, Retriever, is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        logger.warning("serve-retriever: --host %s is reachable from other machines and no token is set: "
                       "anyone who can connect can query it; set %s (or --token)", args.host, TOKEN_ENV)
    check_bindable(args.host, args.port)
    if args.corpus is not None:
        retriever = Retriever.for_corpus(args.corpus, args.index, args.kind, args.embedder, args.shard_size,
                                         args.rerank, args.nprobe, args.ef_search, **_build_params(args))
    elif (args.index / RETRIEVER_META).is_file():
        retriever = Retriever.open(args.index, nprobe=args.nprobe, ef_search=args.ef_search,
                                   rerank=args.rerank)
    else:
        raise UserError(f"--index {args.index} holds no index yet; pass --corpus FILE to build it")
    try:
        server = RetrieverServer(retriever, args.host, args.port, max_body_bytes=args.max_body, token=token,
                                 timeout_s=args.timeout, queue=args.queue,
                                 batch_wait_s=args.batch_wait / 1000, max_connections=args.max_connections)
    except OSError as exc:  # taken meanwhile by another process
        raise _bind_error(args.host, args.port, exc) from exc
    settings = retriever.health().get("index", "")
    print(f"retriever: {retriever.kind} index of {len(retriever)} passages {settings} serving on "
          f"{server.url} (GET /health, POST /search{'; bearer token required' if token else ''}); Ctrl-C "
          "stops it",
          flush=True)
    server.serve_forever()
    return 0
