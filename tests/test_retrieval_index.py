"""BM25 and dense retrieval indexes: meaning, ordering, persistence and errors."""

from __future__ import annotations

import json

import pytest

from data_helpers import make_articles
from memtrain.retrieval.index import BM25Index, DenseIndex, build_index, load_index


@pytest.fixture(scope="module")
def passages() -> tuple[list[str], list[str]]:
    arts = make_articles(n_per_topic=6, seed=3)
    texts = [p for a in arts for p in a["text"].split("\n")]
    topics = [a["topic"] for a in arts for _ in a["text"].split("\n")]
    return texts, topics


def _topic_precision(hits, topics, query_topics, skip_self: list[int] | None = None) -> float:
    same = total = 0
    for qi, row in enumerate(hits):
        for r, _ in row:
            if skip_self is not None and r == skip_self[qi]:
                continue
            same += topics[r] == query_topics[qi]
            total += 1
    return same / total


def test_bm25_finds_passages_of_the_same_topic(passages) -> None:
    texts, topics = passages
    index = BM25Index.build(texts)
    assert len(index) == len(texts)
    queries = [
        "telescope orbit of the comet",
        "violin sonata and the orchestra",
        "anchor on the hull at high tide",
    ]
    hits = index.search(queries, k=5)
    assert _topic_precision(hits, topics, ["astronomy", "music", "sailing"]) == 1.0
    for row in hits:
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    # a passage used as the query finds itself first, and mostly its own topic after that
    rows = list(range(0, len(texts), 7))
    self_hits = index.search([texts[r] for r in rows], k=6)
    assert [h[0][0] for h in self_hits] == rows
    assert _topic_precision(self_hits, topics, [topics[r] for r in rows], skip_self=rows) > 0.8


def test_bm25_edge_cases(passages) -> None:
    texts, _ = passages
    index = BM25Index.build(texts[:5], stemmer=None)
    assert index.search(["zzz qqq"], k=3) == [[]]  # nothing shares a term: no made-up hits
    assert len(index.search([texts[0]], k=50)[0]) <= 5  # k is capped at the index size
    assert index.search([], k=3) == []
    with pytest.raises(ValueError, match="positive integer"):
        index.search(["x"], k=0)
    with pytest.raises(ValueError, match="non-empty list"):
        BM25Index.build([])
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        BM25Index.build(["a b", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown language"):
        BM25Index.build(["a b"], stemmer="klingon")


def test_bm25_save_load_roundtrip_is_atomic(passages, tmp_path) -> None:
    texts, _ = passages
    index = build_index("bm25", texts)
    queries = [texts[3], "gambit and endgame", "basalt volcano"]
    before = index.search(queries, k=4)
    target = tmp_path / "idx"
    target.mkdir()
    (target / "stale.txt").write_text("old", encoding="utf-8")
    index.save(target)
    meta = json.loads((target / "index_meta.json").read_text())
    assert meta["kind"] == "bm25" and meta["size"] == len(texts) and meta["stemmer"] == "english"
    assert not (target / "stale.txt").exists()  # the directory was replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    for loaded in (BM25Index.load(target), BM25Index.load(target, mmap=False), load_index(target)):
        assert isinstance(loaded, BM25Index) and len(loaded) == len(texts)
        assert loaded.search(queries, k=4) == before


def test_load_index_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no index_meta\.json"):
        load_index(tmp_path)
    (tmp_path / "index_meta.json").write_text('{"kind": "magic"}', encoding="utf-8")
    with pytest.raises(ValueError, match="unknown index kind 'magic'"):
        load_index(tmp_path)
    with pytest.raises(ValueError, match="index kind is 'magic', expected 'dense'"):
        DenseIndex.load(tmp_path)
    with pytest.raises(ValueError, match="expected 'bm25' or 'dense'"):
        build_index("tfidf", ["a"])  # type: ignore[arg-type]


@pytest.mark.slow
def test_dense_index_meaning_and_persistence(minilm_dir, passages, tmp_path) -> None:
    texts, topics = passages
    index = DenseIndex.build(texts, model="minilm", batch_size=32)
    assert len(index) == len(texts) and index.index.d == 384
    # paraphrases without the topic's exact words still land in the right topic
    queries = [
        "astronomers looking at the night sky",
        "a classical composer's music",
        "baking bread and cakes",
    ]
    hits = index.search(queries, k=5)
    assert _topic_precision(hits, topics, ["astronomy", "music", "cooking"]) >= 0.8
    rows = [0, 13, 40]
    by_rows = index.search_rows(rows, k=3)
    assert [h[0][0] for h in by_rows] == rows and all(abs(h[0][1] - 1.0) < 1e-4 for h in by_rows)
    index.save(tmp_path / "dense")
    meta = json.loads((tmp_path / "dense" / "index_meta.json").read_text())
    assert meta == {
        **meta,
        "kind": "dense",
        "model": "minilm",
        "dim": 384,
        "size": len(texts),
        "normalized": True,
    }
    loaded = load_index(tmp_path / "dense")
    assert isinstance(loaded, DenseIndex) and loaded._encoder is None  # the encoder opens on first query
    again = loaded.search(queries, k=5)
    assert [[r for r, _ in row] for row in again] == [[r for r, _ in row] for row in hits]
    assert loaded.search_rows(rows, k=3) == by_rows


def _embeddings(n: int, dim: int = 64, latent: int = 8, seed: int = 0):
    """Unit vectors near a low-dimensional subspace (as sentence embeddings lie); ``seed`` draws the points,
    the subspace is the same for every seed (queries and corpus share it)."""
    import numpy as np

    basis = np.random.default_rng(0).normal(size=(latent, dim))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, latent)) @ basis + 0.05 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


def _recall(exact, approx) -> float:
    return sum(len({r for r, _ in a} & {r for r, _ in e}) for a, e in zip(approx, exact, strict=True)) / sum(
        len(e) for e in exact)


def test_approximate_structures_recall_and_memory(tmp_path) -> None:
    """#27: IVF-PQ keeps 1/16 of flat's bytes here (pq_m = dim / 8 codes + ids) and, re-ranking 10 x k
    candidates by their exact vectors, finds flat's top 10; without re-ranking it does not (the codes alone
    are coarse); HNSW and IVF-flat recall >= 0.95 as they are; IVF-flat probing every list is exact; the
    structure, parameters and search effort are saved with the index and settable at load."""
    vectors, queries = _embeddings(12_000), _embeddings(200, seed=1)
    flat = DenseIndex.from_vectors(vectors, "test-embedder")
    exact = flat.search_vectors(queries, 10)
    flat.save(tmp_path / "flat")
    flat_bytes = (tmp_path / "flat" / "index.faiss").stat().st_size
    pq = DenseIndex.from_vectors(vectors, "test-embedder", "ivf-pq", pq_m=8, train_size=5000)
    coarse = _recall(exact, pq.search_vectors(queries, 10))
    pq.rerank_with(vectors, 10)
    assert _recall(exact, pq.search_vectors(queries, 10)) >= 0.95 > coarse
    for structure, index in (("ivf-pq", pq), *((s, DenseIndex.from_vectors(vectors, "test-embedder", s))
                                              for s in ("hnsw", "ivf-flat"))):
        if structure != "ivf-pq":
            assert _recall(exact, index.search_vectors(queries, 10)) >= 0.95, structure
        index.save(tmp_path / structure)
        meta = json.loads((tmp_path / structure / "index_meta.json").read_text())
        assert meta["structure"] == structure and meta["params"] == index.params
        loaded = load_index(tmp_path / structure)
        assert loaded.settings() == {**index.settings(), "rerank": 0}  # re-ranking is a serving choice
    assert (tmp_path / "ivf-pq" / "index.faiss").stat().st_size * 8 <= flat_bytes
    everything = DenseIndex.load(tmp_path / "ivf-flat", nprobe=10**6)  # every list: exact search
    assert [[r for r, _ in row] for row in everything.search_vectors(queries, 10)] == [
        [r for r, _ in row] for row in exact]
    with pytest.raises(ValueError, match="ivf-pq over 500 passages"):
        DenseIndex.from_vectors(vectors[:500], "test-embedder", "ivf-pq")


def test_embedder_prefixes_are_applied_saved_and_restored(tmp_path) -> None:
    """#27: e5 embeds "query: ..." against "passage: ..." (bge: an instruction before queries); the prefixes
    are part of the index, so a loaded index embeds its queries as it was built, and shards of another
    passage prefix are refused."""
    import numpy as np

    from memtrain.errors import UserError
    from memtrain.retrieval.embed import embed_in_shards
    from memtrain.retrieval.index import default_prefixes

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def encode(self, texts, **kwargs):  # type: ignore[no-untyped-def]
            self.seen.extend(texts)
            return np.stack([np.eye(4, dtype="float32")[len(t) % 4] for t in texts])

    assert default_prefixes("intfloat/e5-base-v2") == ("query: ", "passage: ")
    assert default_prefixes("BAAI/bge-base-en-v1.5")[1] == "" and default_prefixes("minilm") == ("", "")
    recorder = Recorder()
    index = DenseIndex(None, "intfloat/e5-base-v2", encoder=recorder)
    vectors = index.encode(["alpha", "beta"], role="passage")
    built = DenseIndex.from_vectors(vectors, index.model)
    built._encoder = recorder
    built.search(["where"], k=1)
    assert recorder.seen == ["passage: alpha", "passage: beta", "query: where"]
    built.save(tmp_path / "e5")
    assert load_index(tmp_path / "e5").prefixes == ("query: ", "passage: ")
    custom = DenseIndex(None, "intfloat/e5-base-v2", encoder=recorder, prefixes=("q> ", "p> "))
    embed_in_shards(["a", "b"], tmp_path / "shards", custom.passage_encoder(), custom.embedding_id(), 1)
    with pytest.raises(UserError, match="other model"):
        embed_in_shards(["a", "b"], tmp_path / "shards", index.passage_encoder(), index.embedding_id(), 1)


def test_shard_vectors_read_rows_across_shards_without_concatenating(tmp_path) -> None:
    import numpy as np

    from memtrain.errors import UserError
    from memtrain.retrieval.embed import ShardVectors, embed_in_shards, shard_path

    texts = [f"passage {i}" for i in range(5)]
    table = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    encode = lambda batch: table[[texts.index(t) for t in batch]]  # noqa: E731
    embed_in_shards(texts, tmp_path, encode, "fake", shard_size=2)
    vectors = ShardVectors(tmp_path)
    assert len(vectors) == 5 and vectors.shape == (5, 3)
    assert np.array_equal(vectors[0:5], table)
    assert np.array_equal(vectors[np.array([4, 0, 3])], table[[4, 0, 3]])
    assert all(isinstance(s, np.memmap) for s in vectors.shards)  # mapped, not loaded
    shard_path(tmp_path, 1).unlink()
    with pytest.raises(UserError, match=r"shards \[1\] are missing"):
        ShardVectors(tmp_path)
