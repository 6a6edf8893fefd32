"""``memtrain serve-retriever``: the search agent's retriever as a local HTTP service.

The index is built on first use (BM25 by default, dense with ``--kind dense``) and saved in ``--index``;
later starts memory-map it. API: ``GET /health``, ``POST /search {"queries": [...], "k": 3}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from memtrain.retrieval.service import RETRIEVER_META, Retriever, RetrieverServer

    if args.corpus is not None:
        retriever = Retriever.for_corpus(args.corpus, args.index, args.kind, args.embedder)
    elif (args.index / RETRIEVER_META).is_file():
        retriever = Retriever.open(args.index)
    else:
        raise ValueError(f"--index {args.index} holds no index yet; pass --corpus FILE to build it")
    server = RetrieverServer(retriever, args.host, args.port, max_body_bytes=args.max_body)
    print(f"retriever: {retriever.kind} index of {len(retriever)} passages serving on {server.url} "
          "(GET /health, POST /search); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
