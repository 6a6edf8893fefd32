"""Load test of `memtrain serve-retriever` (#27): queries/s and latency at 1, 8 and 64 clients and a burst of
200 concurrent clients, with 50 idle sockets held open the whole time.

Corpus: the embedded Wikipedia corpus (``wikipedia-vital``) cut into passages of 3 sentences (wiki-18
layout), indexed with BM25; queries: the first 8 words of other sentences of it (real text). The server is
`memtrain serve-retriever` in a subprocess, imported from ``--src`` (default: this checkout's): pass the
``src`` of another checkout (e.g. ``git archive main src | tar -x -C /tmp/old``) to measure its server the
same way. Clients: asyncio + httpx, one keep-alive connection each, one query (k=3) per request; each phase
runs ``--seconds``. A burst client sends ``--burst-requests`` requests. Counted per phase: 200s, 503s,
connections reset or closed unanswered, timeouts (``--request-timeout``) and other errors.

    python benchmarks/bench_retriever_service.py --out runs/bench-retriever-service
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from _machine import cpu_model, load_average
from memtrain.data.corpus import iter_articles
from memtrain.retrieval.service import Retriever

SRC = Path(__file__).resolve().parents[1] / "src"


def build_corpus(path: Path, passages: int, queries: int, seed: int = 0) -> list[str]:
    """Write ``passages`` passages of 3 sentences; return ``queries`` queries from sentences not indexed."""
    rows, held_out = [], []
    for article in iter_articles("wikipedia-vital"):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", article.text) if len(s.split()) >= 8]
        for i in range(0, len(sentences) - 2, 4):  # 3 indexed, the 4th held out as a query
            if len(rows) < passages:
                text = " ".join(sentences[i:i + 3])
                rows.append({"id": str(len(rows)), "contents": f'"{article.title}"\n{text}'})
            if i + 3 < len(sentences):
                held_out.append(" ".join(sentences[i + 3].split()[:8]))
        if len(rows) >= passages and len(held_out) >= queries:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return random.Random(seed).sample(held_out, queries)


def start_server(src: Path, index: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    run = "import sys; from memtrain.cli.main import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run, "serve-retriever", "--index", str(index), "--port", "0", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"serving on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"the server exited ({proc.wait()}) before serving")


def outcome(exc: BaseException) -> str:
    """'reset' for a connection reset or closed without an answer, 'timeout', else 'error'."""
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout"
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, (ConnectionResetError, BrokenPipeError, httpx.RemoteProtocolError)):
            return "reset"
        chain = chain.__cause__ or chain.__context__
    return "error"


async def client(url: str, queries: list[str], stop_at: float, max_requests: int, timeout_s: float,
                 latencies: list[float], counts: Counter) -> None:
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        sent = 0
        while sent < max_requests and time.perf_counter() < stop_at:
            query = queries[random.randrange(len(queries))]
            start = time.perf_counter()
            try:
                resp = await http.post("/search", json={"queries": [query], "k": 3})
                counts[str(resp.status_code)] += 1
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:
                counts[outcome(exc)] += 1
            sent += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def phase(url: str, queries: list[str], clients: int, seconds: float, max_requests: int,
                timeout_s: float) -> tuple[float, list[float], Counter]:
    latencies: list[float] = []
    counts: Counter = Counter()
    start = time.perf_counter()
    await asyncio.gather(*(client(url, queries, start + seconds, max_requests, timeout_s, latencies, counts)
                           for _ in range(clients)))
    return time.perf_counter() - start, latencies, counts


def idle_state(sockets: list[socket.socket]) -> Counter:
    """How the idle sockets stand: still open, closed by the server, or answered (e.g. 503)."""
    state: Counter = Counter()
    for s in sockets:
        s.setblocking(False)
        try:
            state["answered" if s.recv(1) else "closed"] += 1
        except BlockingIOError:
            state["open"] += 1
        except OSError:
            state["reset"] += 1
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-retriever-service"))
    ap.add_argument("--src", type=Path, default=SRC, help="the memtrain src/ whose server is measured")
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--idle", type=int, default=50, help="idle sockets opened before the clients")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each client phase")
    ap.add_argument("--burst", type=int, default=200, help="concurrent clients of the burst (0: none)")
    ap.add_argument("--burst-requests", type=int, default=5)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--server-args", default="", help="extra serve-retriever arguments")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {load_average()}; server from {args.src}")
    corpus, index = args.out / "corpus.jsonl", args.out / "index"
    queries = build_corpus(corpus, args.passages, args.queries)
    if not (index / "retriever.json").is_file():
        Retriever.build(corpus, index)
    print(f"BM25 over {args.passages:,} passages of the embedded Wikipedia corpus; {len(queries):,} queries")
    proc, url = start_server(args.src, index, args.server_args.split())
    idle: list[socket.socket] = []
    try:
        for _ in range(args.idle):
            idle.append(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10))
        print(f"{url}: {len(idle)} idle sockets open")
        print("\n| clients | requests | queries/s | p50 ms | p99 ms | 200 | 503 | reset | timeout | error |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        runs = [(int(n), args.seconds, 10**9) for n in args.clients.split(",")]
        if args.burst:
            runs.append((args.burst, float("inf"), args.burst_requests))
        for clients, seconds, max_requests in runs:
            elapsed, latencies, counts = asyncio.run(phase(url, queries, clients, seconds, max_requests,
                                                           args.request_timeout))
            other = sum(v for k, v in counts.items() if k not in ("200", "503", "reset", "timeout"))
            label = f"{clients}{' (burst)' if max_requests < 10**9 else ''}"
            print(f"| {label} | {sum(counts.values()):,} | {counts['200'] / elapsed:,.0f} | "
                  f"{1000 * percentile(latencies, 0.5):.1f} | {1000 * percentile(latencies, 0.99):.1f} | "
                  f"{counts['200']} | {counts['503']} | {counts['reset']} | {counts['timeout']} | {other} |",
                  flush=True)
        print(f"\nidle sockets at the end: {dict(idle_state(idle))}; load average {load_average()}")
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
