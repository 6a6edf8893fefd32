"""The wiki-18 corpus reader, the local retriever and its HTTP service (real BM25 index, real sockets)."""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
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
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


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
    assert got == status and message in payload["error"]


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
