"""The wiki-18 corpus reader, the local retriever and its HTTP service (real BM25 index, real sockets)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memtrain.retrieval.corpus import PassageStore, parse_contents, read_passages
from memtrain.retrieval.server import RetrieverServer
from memtrain.retrieval.service import (
    Retriever,
    RetrieverClient,
    RetrieverError,
    default_index_dir,
    open_retriever,
)

PASSAGES = [
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."),
    ("Berlin", "Berlin is the capital and largest city of Germany."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
    ("Python (programming language)", "Python is a programming language created by Guido van Rossum."),
    ("Rome", "Rome is the capital city of Italy and was founded, according to legend, in 753 BC."),
    ("Danube", "The Danube flows through Vienna, Budapest and Belgrade into the Black Sea."),
]


def write_corpus(path: Path, passages: list[tuple[str, str]] = PASSAGES) -> Path:
    lines = [json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) for i, (t, x) in enumerate(passages)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "passages.jsonl")


@pytest.fixture()
def retriever(corpus: Path, tmp_path: Path) -> Retriever:
    return Retriever.build(corpus, tmp_path / "index")


@pytest.fixture()
def server(retriever: Retriever) -> Iterator[RetrieverServer]:
    with RetrieverServer(retriever, "127.0.0.1", 0, max_body_bytes=4096) as srv:
        yield srv


def _post(srv: RetrieverServer, body: bytes, path: str = "/search",
          headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        assert resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class Gate:
    """Wraps ``Retriever.search``: records each index call and, while closed, holds it (so that requests
    queue up behind it deterministically, however slow the machine)."""

    def __init__(self, retriever: Retriever) -> None:
        self.inner = retriever.search
        self.calls: list[tuple[list[str], int]] = []
        self.entered, self.open = threading.Event(), threading.Event()
        self.open.set()

    def __call__(self, queries: list[str], k: int) -> list[list]:
        self.calls.append((list(queries), k))
        self.entered.set()
        assert self.open.wait(60)
        return self.inner(queries, k)


def _wait_until(condition, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _search(srv: RetrieverServer, queries: list[str], k: int) -> tuple[int, dict]:
    return _post(srv, json.dumps({"queries": queries, "k": k}).encode())


def test_corpus_parsing_and_store(corpus: Path, tmp_path: Path) -> None:
    assert parse_contents('"Title, with comma"\nBody text') == ("Title, with comma", "Body text")
    assert parse_contents("no title line") == ("", "no title line")
    passages = read_passages(corpus)
    assert passages[2].title == "Mount Everest" and passages[2].text.startswith("Mount Everest is")
    store, texts = PassageStore.build(corpus, tmp_path / "store")
    assert texts[1] == "Berlin\n" + PASSAGES[1][1] and len(store) == 6
    loaded = PassageStore.load(tmp_path / "store")
    assert [p.title for p in loaded.get([5, 0])] == ["Danube", "Eiffel Tower"]
    with pytest.raises(IndexError, match="out of range"):
        loaded.get([6])
    with corpus.open("a") as fh:  # the corpus changed: the saved offsets no longer describe it
        fh.write(json.dumps({"id": "9", "contents": '"X"\ny'}) + "\n")
    with pytest.raises(ValueError, match="has changed since the index"):
        PassageStore.load(tmp_path / "store")


def test_corpus_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "\\"A\\"\\nx"}\n{"id": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a string field 'contents'"):
        read_passages(bad)
    bad.write_text('{"id": "1", "contents": "a"}\n{"id": "1", "contents": "b"}\n')
    with pytest.raises(ValueError, match="occurs twice"):
        PassageStore.build(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_passages(tmp_path / "none.jsonl")


def test_local_search_ranks_the_right_passage(retriever: Retriever, tmp_path: Path) -> None:
    hits = retriever.search(["capital of Germany", "highest mountain Himalayas"], k=3)
    assert hits[0][0].title == "Berlin" and hits[1][0].title == "Mount Everest"
    assert all(len(row) <= 3 for row in hits)
    assert hits[0][0].score >= hits[0][-1].score
    assert retriever.search(["zzzz qqqq"], 3) == [[]]  # no shared term: no hit
    with pytest.raises(ValueError, match="field 'k'"):
        retriever.search(["x"], 0)
    with pytest.raises(ValueError, match="non-empty list"):
        retriever.search([], 3)
    reopened = Retriever.open(tmp_path / "index")
    assert [h.id for h in reopened.search(["Guido van Rossum"], 1)[0]] == ["3"]


def test_http_search_and_health(server: RetrieverServer) -> None:
    client = RetrieverClient(server.url)
    assert client.health() == {"status": "ok", "kind": "bm25", "passages": 6, "max_k": 100}
    hits = client.search(["Vienna Budapest river", "Italy capital legend"], k=2)
    assert hits[0][0].title == "Danube" and hits[1][0].title == "Rome"
    assert set(hits[0][0].as_dict()) == {"id", "title", "text", "score"}
    status, body = _post(server, json.dumps({"query": "Eiffel Paris", "k": 1}).encode())
    assert status == 200 and body["results"][0][0]["title"] == "Eiffel Tower"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"k": 3}, 400, "field 'queries' is missing"),
    ({"queries": ["a"], "k": 0}, 400, "field 'k': expected an integer from 1 to 100"),
    ({"queries": ["a"], "k": 101}, 400, "field 'k'"),
    ({"queries": ["a"], "k": "3"}, 400, "field 'k'"),
    ({"queries": "a", "k": 3}, 400, "non-empty list of strings"),
    ({"queries": [""], "k": 3}, 400, "'queries'[0]"),
    ({"queries": ["a"], "k": 3, "top": 1}, 400, "unknown field"),
    ([1, 2], 400, "expected a JSON object"),
])
def test_http_bad_requests_get_clear_4xx(server: RetrieverServer, body: object, status: int,
                                         message: str) -> None:
    got, payload = _post(server, json.dumps(body).encode())
    assert got == status and message in payload["error"] and "\n" not in payload["error"]


def test_http_transport_errors(server: RetrieverServer) -> None:
    status, payload = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in payload["error"]
    status, payload = _post(server, b"x" * 5000)  # over max_body_bytes: refused unread
    assert status == 413 and "at most 4096" in payload["error"]
    status, payload = _post(server, b"{}", path="/other")
    assert status == 404
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/search")
    resp = conn.getresponse()
    assert resp.status == 405 and "POST /search" in json.loads(resp.read())["error"]
    conn.close()
    with pytest.raises(RetrieverError, match="HTTP 400: field 'k'"):
        RetrieverClient(server.url).search(["a"], 500)
    status, payload = _post(server, b"{}", path="/health", method="DELETE")
    assert status == 405 and "not allowed" in payload["error"]


def test_concurrent_searches_are_batched_with_identical_results(retriever: Retriever,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """#27: the requests that queue while the index is busy are answered by one index call per k, each
    with exactly what a search of its own returns."""
    gate = Gate(retriever)
    monkeypatch.setattr(retriever, "search", gate)
    requests = [(["capital of Germany"], 3), (["Vienna Budapest river", "Italy capital legend"], 2),
                (["highest mountain Himalayas"], 3), (["Guido van Rossum", "Eiffel Paris"], 1),
                (["zzzz qqqq"], 3), (["Rome founded legend"], 2), (["Black Sea"], 1), (["lattice tower"], 3)]
    expected = [[[h.as_dict() for h in row] for row in gate.inner(q, k)] for q, k in requests]
    with RetrieverServer(retriever, "127.0.0.1", 0) as srv, ThreadPoolExecutor(len(requests) + 1) as pool:
        gate.open.clear()
        first = pool.submit(_search, srv, ["Berlin"], 1)
        assert gate.entered.wait(60)  # the first search holds the index ...
        futures = [pool.submit(_search, srv, q, k) for q, k in requests]
        _wait_until(lambda: srv.batcher.waiting() == len(requests))  # ... while the others queue
        gate.open.set()
        assert first.result(timeout=60)[0] == 200
        answers = [f.result(timeout=60) for f in futures]
    assert [status for status, _ in answers] == [200] * len(requests)
    assert [body["results"] for _, body in answers] == expected
    assert len(gate.calls) == 1 + 3  # the first search, then one call per distinct k (1, 2, 3)
    assert sorted(k for _, k in gate.calls[1:]) == [1, 2, 3]
    assert srv.batcher.requests == 1 + len(requests) and srv.batcher.searches == 4


def test_a_full_queue_answers_503_and_serves_the_rest(retriever: Retriever,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(retriever)
    monkeypatch.setattr(retriever, "search", gate)
    with RetrieverServer(retriever, "127.0.0.1", 0, queue=2) as srv, ThreadPoolExecutor(3) as pool:
        gate.open.clear()
        first = pool.submit(_search, srv, ["Berlin"], 1)
        assert gate.entered.wait(60)
        queued = [pool.submit(_search, srv, [q], 1) for q in ("Rome", "Danube")]
        _wait_until(lambda: srv.batcher.waiting() == 2)
        status, payload = _search(srv, ["Python"], 1)  # a third would wait: turned away at once
        assert status == 503 and "server busy: 2 requests are waiting" in payload["error"]
        gate.open.set()
        answers = [f.result(timeout=60) for f in (first, *queued)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert [a[1]["results"][0][0]["title"] for a in answers] == ["Berlin", "Rome", "Danube"]
        assert _search(srv, ["Python"], 1)[0] == 200  # and it serves again
    assert srv.batcher.busy == 1


def test_idle_sockets_do_not_delay_a_search(server: RetrieverServer) -> None:
    """#27: with the thread-pool server, 10 idle sockets made a search take 9 s and 50 made it time out."""
    idle = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(50)]
    try:
        start = time.monotonic()
        hits = RetrieverClient(server.url, timeout_s=30).search(["capital of Germany"], 1)
        assert hits[0][0].title == "Berlin" and time.monotonic() - start < 5
        for s in idle:  # still open: idle sockets are closed only after the request deadline (30 s)
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in idle:
            s.close()


def test_a_body_that_does_not_arrive_in_time_gets_408(retriever: Retriever) -> None:
    with RetrieverServer(retriever, "127.0.0.1", 0, timeout_s=1.0) as srv, \
            socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"queries\"")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and "not received within 1 s" in json.loads(body)["error"]


def test_bearer_token_on_every_path(retriever: Retriever) -> None:
    with RetrieverServer(retriever, "127.0.0.1", 0, token="s3cret") as srv:
        for path, method in (("/health", "GET"), ("/search", "POST"), ("/nowhere", "GET")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                status, payload = _post(srv, b"{}", path, headers, method)
                assert status == 401 and "bearer token" in payload["error"], (path, headers)
        status, payload = _search(srv, ["Berlin"], 1)
        assert status == 401
        status, payload = _post(srv, json.dumps({"queries": ["Berlin"], "k": 1}).encode(),
                                headers={"Authorization": "bearer s3cret"})
        assert status == 200 and payload["results"][0][0]["title"] == "Berlin"
        assert RetrieverClient(srv.url, token="s3cret").health()["passages"] == 6


def test_client_reports_unreachable_server() -> None:
    with pytest.raises(RetrieverError, match="serve-retriever"):
        RetrieverClient("http://127.0.0.1:9", timeout_s=2).health()


def test_open_retriever_dispatch_and_cache(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           server: RetrieverServer) -> None:
    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))
    first = open_retriever(corpus)
    assert isinstance(first, Retriever)
    cached = default_index_dir(corpus, "bm25")
    assert (cached / "retriever.json").is_file() and cached.is_relative_to(tmp_path / "home")
    mtime = os.stat(cached / "retriever.json").st_mtime_ns
    again = open_retriever(corpus)  # loaded, not rebuilt
    assert os.stat(cached / "retriever.json").st_mtime_ns == mtime
    assert again.search(["Berlin"], 1)[0][0].title == "Berlin"
    assert isinstance(open_retriever(cached), Retriever)
    assert isinstance(open_retriever(server.url), RetrieverClient)
    with pytest.raises(FileNotFoundError, match="--retriever"):
        open_retriever(tmp_path / "nothing")
    with pytest.raises(ValueError, match="holds a 'bm25' index, not 'dense'"):
        Retriever.for_corpus(corpus, cached, kind="dense")


@pytest.mark.slow
def test_dense_index_option(corpus: Path, tmp_path: Path, minilm_dir: str) -> None:
    dense = Retriever.build(corpus, tmp_path / "dense", kind="dense", embedder=minilm_dir)
    assert dense.kind == "dense"
    assert dense.search(["tallest peak on Earth"], 1)[0][0].title == "Mount Everest"
    assert Retriever.open(tmp_path / "dense").search(["German capital"], 1)[0][0].title == "Berlin"


def test_serve_retriever_cli_rejects_missing_corpus(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from memtrain.cli.main import main

    assert main(["serve-retriever", "--index", str(tmp_path / "idx")]) == 1
    assert "pass --corpus" in capsys.readouterr().err


def test_an_index_embedded_by_two_processes_in_shard_ranges(minilm_dir: str, tmp_path: Path) -> None:
    """#27: `build-index --shards A:B` in two processes (here two calls) embeds one set of shards; the
    run that completes it builds the index, which equals one built in one go; an approximate index
    re-ranks from those shards and /health says how it searches."""
    import numpy as np

    from data_helpers import make_articles
    from memtrain.retrieval.embed import missing_shards
    from memtrain.retrieval.service import shards_dir

    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for i, a in enumerate(make_articles(n_per_topic=4, seed=5)):
            fh.write(json.dumps({"id": str(i), "contents": f'"{a["title"]}"\n{a["text"]}'}) + "\n")
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert Retriever.build(corpus, split, "ivf-flat", shard_size=5, only=range(0, 2)) is None
    assert not split.exists() and missing_shards(shards_dir(split))
    served = Retriever.build(corpus, split, "ivf-flat", shard_size=5, only=range(2, 100 // 5))
    assert served is not None and not missing_shards(shards_dir(split))
    one_go = Retriever.build(corpus, whole, "ivf-flat", shard_size=5)
    a, b = served.index.index, one_go.index.index
    assert np.array_equal(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal))
    health = Retriever.open(split, nprobe=4, rerank=3).health()
    assert health["kind"] == "ivf-flat" and health["index"]["rerank"] == 3
    assert health["index"]["structure"] == "ivf-flat" and health["index"]["nprobe"] >= 1
    query = "a classical composer's music"
    assert [h.id for h in served.search([query], 3)[0]] == [h.id for h in one_go.search([query], 3)[0]]
