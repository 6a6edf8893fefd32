"""Passage embeddings built in shards that survive a crash (#27): a 21M-passage corpus takes hours to embed.

``embed_in_shards`` writes ``emb-NNNNNN.npy`` (float32, L2-normalised rows, ``shard_size`` passages each) into
a directory, every shard atomically (a temp file renamed into place), after a ``shards.json`` manifest naming
the embedder, the shard size and a sha256 of the passage texts. A killed build, rerun, skips the shards that
are there and embeds the first missing one on; a manifest of other texts or another embedder is refused, so
shards of different builds never mix. ``only`` restricts a process to a range of shard numbers, so several
processes or machines (sharing the directory) build one set. ``ShardVectors`` reads them back in order
(memory-mapped) for any index kind, so a second index kind needs no second embedding pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from memtrain.errors import UserError
from memtrain.io import atomic_write_bytes, atomic_write_json
from memtrain.log import logger

MANIFEST = "shards.json"


def shard_path(directory: Path, i: int) -> Path:
    return Path(directory) / f"emb-{i:06d}.npy"


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _manifest(directory: Path, texts: Sequence[str], model: str, shard_size: int) -> dict:
    """Write the manifest of a new shard directory, or check that of an existing one against this build."""
    want = {"model": model, "num_texts": len(texts), "shard_size": shard_size,
            "num_shards": -(-len(texts) // shard_size), "texts_sha256": texts_sha256(texts)}
    path = Path(directory) / MANIFEST
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise UserError(f"{path}: these shards were built with other {', '.join(diff)} "
                            f"({', '.join(f'{k}={have.get(k)!r}' for k in diff)}); use another directory or "
                            "delete it to start over")
        return have
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, want)
    return want


def _save_shard(path: Path, vectors: np.ndarray) -> None:
    """One shard, atomically: a reader (or a resumed build) sees the whole array or no file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def _complete(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError):  # a damaged shard is embedded again
        return False


def embed_in_shards(texts: Sequence[str], directory: Path, encode: Callable[[list[str]], np.ndarray],
                    model: str, shard_size: int = 100_000, only: range | None = None) -> list[int]:
    """Embed ``texts`` into ``directory`` shard by shard (``encode``: texts -> normalised float32 rows);
    returns the shard numbers embedded by this call (the others were there already)."""
    if shard_size < 1:
        raise UserError(f"shard size {shard_size}: expected >= 1")
    manifest = _manifest(Path(directory), texts, model, shard_size)
    total = manifest["num_shards"]
    if only is not None and not 0 <= only.start < total:
        raise UserError(f"shards {only.start}:{only.stop}: the build has shards 0:{total}")
    shards = range(total) if only is None else range(only.start, min(only.stop, total))  # B: at most the end
    todo = [i for i in shards
            if not _complete(shard_path(directory, i), len(texts[i * shard_size:(i + 1) * shard_size]))]
    start = time.time()
    for done, i in enumerate(todo, start=1):
        vectors = encode(list(texts[i * shard_size:(i + 1) * shard_size]))
        _save_shard(shard_path(directory, i), vectors)
        rate = (time.time() - start) / done
        logger.info("embedding: shard %d (%d/%d this run), %.0f passages/s, ETA %.0fs", i, done,
                    len(todo), len(vectors) / max(rate, 1e-9), rate * (len(todo) - done))
    return todo


def missing_shards(directory: Path) -> list[int]:
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    n, size = manifest["num_texts"], manifest["shard_size"]
    return [i for i in range(manifest["num_shards"])
            if not _complete(shard_path(directory, i), min(size, n - i * size))]


class ShardVectors:
    """The vectors of a complete shard directory as one read-only array of rows, memory-mapped shard by
    shard and never concatenated: an index is built from it piece by piece, and an approximate index
    re-ranks its candidates with it, without a copy of the corpus's vectors in memory. Supports ``len``,
    ``shape`` and indexing by a slice or an array of row numbers."""

    def __init__(self, directory: Path):
        manifest_path = Path(directory) / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{directory}: no {MANIFEST}; not an embedding shard directory")
        missing = missing_shards(directory)
        if missing:
            raise UserError(f"{directory}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are "
                            f"missing ({len(missing)} of them); run the build again (it resumes) to finish "
                            "them")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.shard_size = int(manifest["shard_size"])
        self.shards = [np.load(shard_path(directory, i), mmap_mode="r")
                       for i in range(manifest["num_shards"])]
        self.shape = (int(manifest["num_texts"]), int(self.shards[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for shard in np.unique(rows // self.shard_size):  # one gather per shard touched
            here = rows // self.shard_size == shard
            out[here] = self.shards[shard][rows[here] % self.shard_size]
        return out
