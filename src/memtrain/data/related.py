"""The passages a proxy document is assembled from besides its pivot: the related ones (a retrieval index over
the passage store, built once and cached) and the rows a held-out set must not draw from (``--exclude-from``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrain.data.corpus import PassageStore
from memtrain.data.dataset import iter_rows, read_manifest
from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.retrieval.index import BM25Index, DenseIndex, build_index, load_index

if TYPE_CHECKING:
    from memtrain.data.proxy import ProxyConfig

_RELATED_MARGIN = 8  # extra hits asked for, to make up for the pivot itself and duplicate passages


def _index_dir(cache: Path, store: PassageStore, cfg: ProxyConfig) -> Path:
    if cfg.retriever == "bm25":
        return cache / "index" / f"{store.key}-bm25"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.embedder).strip("_")[-60:]
    return cache / "index" / f"{store.key}-dense-{slug}"


def open_index(
    store: PassageStore, cfg: ProxyConfig, cache: Path
) -> tuple[BM25Index | DenseIndex, Path, bool]:
    """The retrieval index over the store's passages: loaded from the cache, or built once and saved there."""
    directory = _index_dir(cache, store, cfg)
    if (directory / "index_meta.json").is_file():
        index = load_index(directory)
        if len(index) == len(store) and (not isinstance(index, DenseIndex) or index.model == cfg.embedder):
            logger.info("reusing %s index %s", cfg.retriever, directory)
            return index, directory, True
        logger.warning("cached index %s does not match the corpus; rebuilding it", directory)
    start = time.time()
    texts = store.all_texts()
    if cfg.retriever == "dense":
        index = build_index("dense", texts, model=cfg.embedder, batch_size=cfg.embed_batch_size)
    else:
        index = build_index("bm25", texts)
    index.save(directory)
    logger.info("built %s index over %d passages in %.1fs", cfg.retriever, len(store), time.time() - start)
    return index, directory, False


def related_passages(
    index: BM25Index | DenseIndex, store: PassageStore, pivots: list[int], n: int,
    excluded: np.ndarray | None = None,
) -> list[list[int]]:
    """For each pivot row, up to ``n`` most similar other passages, best first; the pivot itself, passages
    whose text duplicates an earlier one and rows flagged in ``excluded`` (a held-out set's exclusions) are
    skipped. Dense indexes search by the stored pivot vectors, BM25 by the pivot text. BM25 may return fewer
    than ``n`` (only passages sharing a term count)."""
    if n <= 0 or not pivots:
        return [[] for _ in pivots]
    margin = _RELATED_MARGIN if excluded is None or not excluded.any() else 4 * _RELATED_MARGIN + n
    k = min(len(store), n + 1 + margin)
    if isinstance(index, DenseIndex):
        hits = index.search_rows(pivots, k)
    else:
        hits = index.search(store.texts(pivots), k)
    out: list[list[int]] = []
    for pivot, h in zip(pivots, hits, strict=True):
        cand = [r for r, _ in h if r != pivot and (excluded is None or not excluded[r])]
        texts = store.texts([pivot, *cand])
        seen = {texts[0]}
        rel: list[int] = []
        for r, t in zip(cand, texts[1:], strict=True):
            if t not in seen and len(rel) < n:
                rel.append(r)
                seen.add(t)
        out.append(rel)
    return out


def excluded_rows(store: PassageStore, datasets: list[str], task: str = "proxy"
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows of every article that a document of ``datasets`` (proxy datasets over this same passage store)
    drew a passage from, as a mask over the store; and what was excluded, for the manifest."""

    used: set[int] = set()
    for data_dir in datasets:
        manifest = read_manifest(data_dir)
        key = (manifest.get("corpus") or {}).get("key")
        if manifest.get("task") != task or key != store.key:
            raise UserError(
                f"--exclude-from {data_dir}: expected a proxy dataset built from the same corpus (passage "
                f"store {store.key}), found task {manifest.get('task')!r} over store {key!r}"
            )
        for row in iter_rows(data_dir, columns=["passage_ids"]):
            used.update(int(r) for r in row["passage_ids"])
    articles = np.asarray(store.table.column("article").to_numpy(zero_copy_only=False))
    used_articles = np.unique(articles[sorted(used)]) if used else np.empty(0, dtype=articles.dtype)
    mask = np.isin(articles, used_articles)
    info = {"datasets": [str(Path(d).resolve()) for d in datasets], "articles": len(used_articles),
            "passages": int(mask.sum())}
    return mask, info
