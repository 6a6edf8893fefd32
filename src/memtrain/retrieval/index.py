"""Retrieval indexes over a list of passages: BM25 (bm25s) and dense (sentence-transformers + FAISS).

Both return, per query, ``(row index, score)`` pairs best first, where the row index is the position of the
passage in the ``texts`` list the index was built from. ``save`` writes a directory atomically (the directory
belongs to the index: it is replaced as a whole) with ``index_meta.json`` naming the kind; ``load_index``
dispatches on it. Used by the proxy-data builder (related passages) and the search agent's retriever.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memtrain.assets import resolve
from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger, progress_enabled
from memtrain.retrieval.embed import ShardVectors, embed_in_shards

META_FILE = "index_meta.json"
FORMAT_VERSION = 1
Hits = list[list[tuple[int, float]]]


def _check_build(texts: list[str]) -> None:
    if not isinstance(texts, list) or not texts:
        raise ValueError("cannot build an index over no texts: expected a non-empty list of strings")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"index texts[{bad}] is {type(texts[bad]).__name__}, expected str")


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"search k={k!r}: expected a positive integer")


def _read_meta(directory: Path, kind: str | None = None) -> dict[str, Any]:
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {META_FILE}; expected a directory written by an index's save()"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"{meta_path}: index kind is {meta.get('kind')!r}, expected {kind!r}")
    return meta


class BM25Index:
    """Okapi BM25 over lower-cased word tokens (English stop words removed, optional Snowball stemming).

    Only passages sharing at least one term with the query are returned (score > 0), so a query may get
    fewer than ``k`` hits.
    """

    kind = "bm25"

    def __init__(self, retriever: Any, size: int, stemmer: str | None = "english"):
        self.retriever = retriever
        self.size = size
        self.stemmer_name = stemmer
        self._stemmer = self._make_stemmer(stemmer)

    @staticmethod
    def _make_stemmer(name: str | None) -> Any:
        if name is None:
            return None
        import Stemmer

        try:
            return Stemmer.Stemmer(name)
        except KeyError:
            raise UserError(
                f"BM25 stemmer {name!r}: unknown language; expected one of "
                f"{', '.join(Stemmer.algorithms())} or None"
            ) from None

    def _tokenize(self, texts: list[str], return_ids: bool) -> Any:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords="en", stemmer=self._stemmer, return_ids=return_ids, show_progress=False
        )

    @classmethod
    def build(cls, texts: list[str], stemmer: str | None = "english") -> BM25Index:
        import bm25s

        _check_build(texts)
        index = cls(None, len(texts), stemmer)
        retriever = bm25s.BM25()
        retriever.index(index._tokenize(texts, return_ids=True), show_progress=False)
        index.retriever = retriever
        return index

    def search(self, queries: list[str], k: int) -> Hits:
        _check_k(k)
        if not queries:
            return []
        tokens = self._tokenize(list(queries), return_ids=False)
        docs, scores = self.retriever.retrieve(tokens, k=min(k, self.size), show_progress=False)
        return [
            [(int(d), float(s)) for d, s in zip(drow, srow, strict=True) if s > 0]
            for drow, srow in zip(docs, scores, strict=True)
        ]

    def save(self, directory: str | Path) -> None:
        with atomic_dir(Path(directory)) as tmp:
            self.retriever.save(str(tmp), show_progress=False)
            atomic_write_json(
                tmp / META_FILE,
                {
                    "kind": self.kind,
                    "format_version": FORMAT_VERSION,
                    "size": self.size,
                    "stemmer": self.stemmer_name,
                    "stopwords": "en",
                },
            )

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> BM25Index:
        import bm25s

        meta = _read_meta(Path(directory), cls.kind)
        retriever = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        return cls(retriever, int(meta["size"]), meta.get("stemmer"))

    def __len__(self) -> int:
        return self.size


# The FAISS structures of a dense index (#27): exact flat search, or approximate ones for corpora whose flat
# index does not fit in memory (wiki-18: 21M x 768 fp32 = 64 GB). IVF-PQ keeps pq_m bytes per passage.
STRUCTURES = ("flat", "ivf-flat", "ivf-pq", "hnsw")
_MIN_PER_CENTROID = 39  # FAISS's k-means warns below this many training points per centroid


def faiss_factory(structure: str, dim: int, n: int, nlist: int | None = None, pq_m: int | None = None,
                  hnsw_m: int = 32) -> tuple[str, dict[str, int]]:
    """The ``faiss.index_factory`` string of ``structure`` for ``n`` vectors of ``dim``, and its parameters
    (defaults: nlist ~ 4 sqrt(n), pq_m = dim / 8 one-byte codes, i.e. 1/32 of flat's memory)."""
    if structure == "flat":
        return "Flat", {}
    if structure == "hnsw":
        return f"HNSW{hnsw_m},Flat", {"hnsw_m": hnsw_m}
    if structure not in ("ivf-flat", "ivf-pq"):
        raise UserError(f"dense index structure {structure!r}: expected one of {', '.join(STRUCTURES)}")
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // _MIN_PER_CENTROID))
    if structure == "ivf-flat":
        return f"IVF{nlist},Flat", {"nlist": nlist}
    pq_m = pq_m or max(1, dim // 8)
    if dim % pq_m:
        raise UserError(f"ivf-pq: pq_m={pq_m} must divide the embedding dimension {dim}")
    if n < 16 * _MIN_PER_CENTROID:
        raise UserError(f"ivf-pq over {n} passages: its codebooks need at least {16 * _MIN_PER_CENTROID} "
                        "to train; use flat (exact) for a corpus this small")
    # one-byte codes (256 centroids per sub-vector) need 256 x 39 passages to train; a smaller corpus gets
    # 4 to 7 bits, so that IVF-PQ can be tried (and tested) end to end on it
    bits = min(8, int(math.log2(n / _MIN_PER_CENTROID)))
    params = {"nlist": nlist, "pq_m": pq_m, **({"pq_bits": bits} if bits < 8 else {})}
    return f"IVF{nlist},PQ{pq_m}x{bits}", params


def default_prefixes(model: str) -> tuple[str, str]:
    """(query, passage) prefixes an embedder was trained with: e5 models expect "query: " / "passage: ",
    English bge models an instruction before queries only; others none."""
    name = model.lower()
    if "e5" in name:
        return "query: ", "passage: "
    if "bge" in name and "-en" in name:
        return "Represent this sentence for searching relevant passages: ", ""
    return "", ""


class DenseIndex:
    """Normalised sentence-transformers embeddings in a FAISS inner-product (= cosine) index: exact (flat)
    or approximate (``STRUCTURES``), with its search effort (``nprobe``, ``ef_search``) set at load.
    ``prefixes``: (query, passage) texts prepended before embedding (default: ``default_prefixes``), saved
    with the index so its queries are embedded as its passages were meant to be matched."""

    kind = "dense"

    def __init__(self, index: Any, model: str, encoder: Any = None, structure: str = "flat",
                 params: dict[str, int] | None = None, prefixes: tuple[str, str] | None = None):
        self.index = index
        self.model = model
        self._encoder = encoder
        self.structure = structure
        self.params = dict(params or {})
        self.prefixes = tuple(prefixes) if prefixes is not None else default_prefixes(model)
        self._rerank: tuple[Any, int] | None = None  # (exact vectors, indexable by rows; candidates per hit)

    def rerank_with(self, vectors: Any, factor: int = 10) -> None:
        """Re-rank an approximate index's ``factor`` x k candidates by their exact inner products, read
        from ``vectors`` (an array, or :class:`memtrain.retrieval.embed.ShardVectors` on disk): recall close
        to flat's, while memory holds only the compressed codes. ``factor`` 0 turns it off."""
        self._rerank = (vectors, factor) if factor > 0 and self.structure != "flat" else None

    def settings(self) -> dict[str, Any]:
        """What is served: the structure, its parameters and search effort, and the re-ranking factor."""
        return {"structure": self.structure, **self.params, "rerank": self._rerank[1] if self._rerank else 0}

    @staticmethod
    def load_encoder(model: str) -> Any:
        """The sentence-transformers model of an embedded short name (``minilm``), a local dir or HF name."""
        from sentence_transformers import SentenceTransformer


        path = resolve(model, kind="embedder")
        try:
            return SentenceTransformer(path)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"embedding model {model!r}: cannot load it with sentence-transformers ({exc}); "
                "expected 'minilm', a sentence-transformers directory or a Hugging Face name"
            ) from None

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self.load_encoder(self.model)
        return self._encoder

    def encode(self, texts: list[str], batch_size: int = 64, role: str = "query") -> np.ndarray:
        """Normalised float32 embeddings of ``texts`` as queries or (``role="passage"``) passages."""
        prefix = self.prefixes[0 if role == "query" else 1]
        vecs = self.encoder.encode(
            [prefix + t for t in texts],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress_enabled(),
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    @classmethod
    def build(cls, texts: list[str], model: str = "minilm", batch_size: int = 64, structure: str = "flat",
              shards_dir: Path | None = None, shard_size: int = 100_000,
              prefixes: tuple[str, str] | None = None, **params: Any) -> DenseIndex:
        """Embed ``texts`` (into resumable shards in ``shards_dir`` when given) and index them."""

        _check_build(texts)
        start = time.time()
        encoder = cls(None, model, prefixes=prefixes)
        if shards_dir is None:
            vecs = encoder.encode(texts, batch_size=batch_size, role="passage")
        else:
            embed_in_shards(texts, shards_dir, encoder.passage_encoder(batch_size), encoder.embedding_id(),
                            shard_size)
            vecs = ShardVectors(shards_dir)  # memory-mapped: added to the index piece by piece
        index = cls.from_vectors(vecs, model, structure, **params)
        index._encoder, index.prefixes = encoder._encoder, encoder.prefixes
        logger.info("dense index (%s): %d passages embedded with %s and indexed in %.1fs", structure,
                    len(texts), model, time.time() - start)
        return index

    def passage_encoder(self, batch_size: int = 64) -> Any:
        return lambda texts: self.encode(texts, batch_size=batch_size, role="passage")

    def embedding_id(self) -> str:
        """What made the passage vectors (a shard directory refuses shards of another): model + prefix."""
        return self.model + (f" [passage prefix {self.prefixes[1]!r}]" if self.prefixes[1] else "")

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, model: str, structure: str = "flat", nlist: int | None = None,
                     pq_m: int | None = None, hnsw_m: int = 32, train_size: int = 200_000,
                     seed: int = 0) -> DenseIndex:
        """Index normalised ``vectors`` (rows in passage order); approximate structures are trained on a
        seeded sample of ``train_size`` rows first."""
        import faiss

        n, dim = vectors.shape
        factory, params = faiss_factory(structure, dim, n, nlist, pq_m, hnsw_m)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rows = np.sort(np.random.default_rng(seed).choice(n, min(n, train_size), replace=False))
            index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
            params["train_size"] = len(rows)
        for lo in range(0, n, 100_000):  # in pieces: the vectors may be memory-mapped shards
            index.add(np.ascontiguousarray(vectors[lo:lo + 100_000], dtype=np.float32))
        out = cls(index, model, structure=structure, params=params)
        out.set_search()
        return out

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """The search effort of an approximate index (more = higher recall, slower): IVF lists probed
        (default 32), HNSW candidates kept (default 128); flat search is exact and ignores both."""
        import faiss

        if self.structure.startswith("ivf"):
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(nprobe or self.params.get("nprobe", 32), ivf.nlist)
            self.params["nprobe"] = int(ivf.nprobe)
        elif self.structure == "hnsw":
            self.index.hnsw.efSearch = ef_search or self.params.get("ef_search", 128)
            self.params["ef_search"] = int(self.index.hnsw.efSearch)

    def search_vectors(self, vectors: np.ndarray, k: int) -> Hits:
        _check_k(k)
        if len(vectors) == 0:
            return []
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        wide = min(k * self._rerank[1], len(self)) if self._rerank else min(k, len(self))
        scores, ids = self.index.search(queries, wide)
        if self._rerank is None:
            return [[(int(i), float(s)) for i, s in zip(irow, srow, strict=True) if i >= 0]
                    for irow, srow in zip(ids, scores, strict=True)]
        out = []
        for query, irow in zip(queries, ids, strict=True):
            found = irow[irow >= 0]
            exact = (np.asarray(self._rerank[0][found], dtype=np.float32) @ query if len(found)
                     else np.zeros(0, dtype=np.float32))
            best = np.argsort(-exact, kind="stable")[:k]
            out.append([(int(found[j]), float(exact[j])) for j in best])
        return out

    def search(self, queries: list[str], k: int) -> Hits:
        _check_k(k)
        if not queries:
            return []
        return self.search_vectors(self.encode(list(queries)), k)

    def search_rows(self, rows: list[int], k: int) -> Hits:
        """Neighbours of indexed passages by their stored vectors (no re-encoding); each row finds itself
        (approximate structures: by their reconstructed, compressed vectors)."""
        import faiss

        if self.structure.startswith("ivf"):
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()  # in memory, on first use: not stored with the index
        vecs = self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))
        return self.search_vectors(vecs, k)

    def save(self, directory: str | Path) -> None:
        import faiss

        with atomic_dir(Path(directory)) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            atomic_write_json(
                tmp / META_FILE,
                {
                    "kind": self.kind,
                    "format_version": FORMAT_VERSION,
                    "size": len(self),
                    "model": self.model,
                    "dim": self.index.d,
                    "metric": "inner_product",
                    "normalized": True,
                    "structure": self.structure,
                    "params": self.params,
                    "prefixes": list(self.prefixes),
                },
            )

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True, nprobe: int | None = None,
             ef_search: int | None = None) -> DenseIndex:
        """Load a saved index, memory-mapped where FAISS can map its structure (flat, IVF), with its search
        effort (``nprobe``/``ef_search``; default: what was saved)."""
        import faiss

        meta = _read_meta(Path(directory), cls.kind)
        path = str(Path(directory) / "index.faiss")
        try:
            raw = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        except RuntimeError:  # a structure FAISS cannot map (HNSW's graph): read into memory
            raw = faiss.read_index(path)
        prefixes = meta.get("prefixes")
        index = cls(raw, str(meta["model"]), structure=str(meta.get("structure", "flat")),
                    params=meta.get("params") or {}, prefixes=tuple(prefixes) if prefixes else ("", ""))
        index.set_search(nprobe, ef_search)
        return index

    def __len__(self) -> int:
        return int(self.index.ntotal)


def build_index(kind: Literal["bm25", "dense"], texts: list[str], **kwargs: Any) -> BM25Index | DenseIndex:
    if kind == "bm25":
        return BM25Index.build(texts, **kwargs)
    if kind == "dense":
        return DenseIndex.build(texts, **kwargs)
    raise UserError(f"index kind {kind!r}: expected 'bm25' or 'dense'")


def load_index(directory: str | Path) -> BM25Index | DenseIndex:
    kind = _read_meta(Path(directory)).get("kind")
    if kind == "bm25":
        return BM25Index.load(directory)
    if kind == "dense":
        return DenseIndex.load(directory)
    raise UserError(
        f"{Path(directory) / META_FILE}: unknown index kind {kind!r}; expected 'bm25' or 'dense'"
    )
