"""Retrieval indexes over a list of passages: BM25 (bm25s) and dense (sentence-transformers + FAISS).

Both return, per query, ``(row index, score)`` pairs best first, where the row index is the position of the
passage in the ``texts`` list the index was built from. ``save`` writes a directory atomically (the directory
belongs to the index: it is replaced as a whole) with ``index_meta.json`` naming the kind; ``load_index``
dispatches on it. Used by the proxy-data builder (related passages) and the search agent's retriever.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger, progress_enabled

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


class DenseIndex:
    """Normalised sentence-transformers embeddings in a FAISS inner-product (= cosine) flat index."""

    kind = "dense"

    def __init__(self, index: Any, model: str, encoder: Any = None):
        self.index = index
        self.model = model
        self._encoder = encoder

    @staticmethod
    def load_encoder(model: str) -> Any:
        """The sentence-transformers model of an embedded short name (``minilm``), a local dir or HF name."""
        from sentence_transformers import SentenceTransformer

        from memtrain.assets import resolve

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

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        vecs = self.encoder.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress_enabled(),
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    @classmethod
    def build(cls, texts: list[str], model: str = "minilm", batch_size: int = 64) -> DenseIndex:
        import faiss

        _check_build(texts)
        start = time.time()
        index = cls(None, model)
        vecs = index.encode(texts, batch_size=batch_size)
        flat = faiss.IndexFlatIP(vecs.shape[1])
        flat.add(vecs)
        index.index = flat
        logger.info(
            "dense index: %d passages embedded with %s in %.1fs", len(texts), model, time.time() - start
        )
        return index

    def search_vectors(self, vectors: np.ndarray, k: int) -> Hits:
        _check_k(k)
        if len(vectors) == 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self)))
        return [
            [(int(i), float(s)) for i, s in zip(irow, srow, strict=True) if i >= 0]
            for irow, srow in zip(ids, scores, strict=True)
        ]

    def search(self, queries: list[str], k: int) -> Hits:
        _check_k(k)
        if not queries:
            return []
        return self.search_vectors(self.encode(list(queries)), k)

    def search_rows(self, rows: list[int], k: int) -> Hits:
        """Neighbours of indexed passages by their stored vectors (no re-encoding); each row finds itself."""
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
                },
            )

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> DenseIndex:
        import faiss

        meta = _read_meta(Path(directory), cls.kind)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(Path(directory) / "index.faiss"), flags), str(meta["model"]))

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
