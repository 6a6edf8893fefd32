"""``memtrain serve-retriever``: the search agent's retriever as a local HTTP service.

The index is built on first use (BM25 by default, dense with ``--kind dense``) and saved in ``--index``;
later starts memory-map it. API: ``GET /health``, ``POST /search {"queries": [...], "k": 3}``.

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
    p.add_argument("--kind", choices=["bm25", "dense"], default="bm25", help="index kind (default bm25)")
    p.add_argument("--embedder", default="minilm",
                   help="sentence-transformers model for --kind dense (default minilm, embedded)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001; 0 = any free port)")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB)")
    p.add_argument("--token", default=None,
                   help="bearer token every request must carry (default: $MEMTRAIN_RETRIEVER_TOKEN; prefer "
                   "the variable, a command line is visible to other users); set one when --host is not "
                   "loopback")
    p.add_argument("--threads", type=int, default=8, help="worker threads serving connections (default 8)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request must arrive within this long, else its connection is closed (default 30)")
    p.set_defaults(func=_serve)


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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            sock.bind(address)
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc


def _serve(args: argparse.Namespace) -> int:
    from memtrain.log import logger
    from memtrain.retrieval.service import RETRIEVER_META, TOKEN_ENV, Retriever, RetrieverServer, is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        logger.warning("serve-retriever: --host %s is reachable from other machines and no token is set: "
                       "anyone who can connect can query it; set %s (or --token)", args.host, TOKEN_ENV)
    check_bindable(args.host, args.port)
    if args.corpus is not None:
        retriever = Retriever.for_corpus(args.corpus, args.index, args.kind, args.embedder)
    elif (args.index / RETRIEVER_META).is_file():
        retriever = Retriever.open(args.index)
    else:
        raise UserError(f"--index {args.index} holds no index yet; pass --corpus FILE to build it")
    try:
        server = RetrieverServer(retriever, args.host, args.port, max_body_bytes=args.max_body, token=token,
                                 threads=args.threads, timeout_s=args.timeout)
    except OSError as exc:  # taken meanwhile by another process
        raise _bind_error(args.host, args.port, exc) from exc
    print(f"retriever: {retriever.kind} index of {len(retriever)} passages serving on {server.url} "
          f"(GET /health, POST /search{'; bearer token required' if token else ''}); Ctrl-C stops it",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
