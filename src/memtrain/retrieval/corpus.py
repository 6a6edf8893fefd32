"""The search corpus: wiki-18 style passage JSONL, read as a stream and served by random access.

Layout (the 2018 Wikipedia passage corpus of search-agent work, DPR split into ~100-word passages)::

    {"id": "0", "contents": "\\"Evan Morris\\"\\nEvan Morris Evan L. Morris (January 26, 1977 ..."}

``contents`` is the quoted title, a newline, then the passage text. Records with separate ``title`` and
``text`` fields are accepted too. The full corpus has 21M passages (~13 GB), so it is never loaded whole:
``PassageStore`` keeps one int64 byte offset per passage (memory-mapped ``.npy``) and reads passages back
from the JSONL file on demand; the corpus file's size and mtime are recorded so a changed file is detected.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memtrain.errors import UserError
from memtrain.io import atomic_write_bytes, atomic_write_json

OFFSETS_FILE = "passages.offsets.npy"
STORE_META = "passages.json"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def contents(self) -> str:
        """What retrieval indexes: the title then the text (titles carry much of a passage's topic)."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_contents(contents: str) -> tuple[str, str]:
    """``"\\"Title\\"\\ntext"`` -> (Title, text); without a title line the title is empty."""
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents.strip()
    title = head.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title.strip(), rest.strip()


def parse_passage(record: Any, where: str) -> Passage:
    """One JSON record -> ``Passage``; errors name the file and line."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with 'id' and 'contents', "
                        f"got {type(record).__name__}")
    pid = record.get("id", record.get("_id"))
    if not isinstance(pid, str | int) or str(pid) == "":
        raise UserError(f"{where}: field 'id': expected a non-empty passage id, got {pid!r}")
    if isinstance(record.get("contents"), str):
        title, text = parse_contents(record["contents"])
    elif isinstance(record.get("text"), str):
        title, text = str(record.get("title") or "").strip(), record["text"].strip()
    else:
        raise UserError(f"{where}: expected a string field 'contents' (\"\\\"Title\\\"\\ntext\") or "
                        f"'text' (+ optional 'title'), got keys {sorted(record)}")
    return Passage(str(pid), title, text)


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search corpus {path} does not exist (expected wiki-18 style JSONL: "
                                "one {\"id\", \"contents\"} object per line)")
    return path


def iter_passages(path: str | Path) -> Iterator[tuple[int, Passage]]:
    """(byte offset, passage) for every non-empty line, streaming (constant memory)."""
    path = _check_file(Path(path))
    with path.open("rb") as fh:
        lineno = 0
        while True:
            offset = fh.tell()
            line = fh.readline()
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc}); "
                                "expected one passage per line") from exc
            yield offset, parse_passage(record, f"{path}:{lineno}")


def read_passages(path: str | Path) -> list[Passage]:
    """All passages of a (small) corpus in memory; use ``PassageStore`` for wiki-18 itself."""
    return [p for _, p in iter_passages(path)]


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"corpus": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class PassageStore:
    """Random access to the passages of a JSONL corpus by row number (the row numbers an index returns)."""

    def __init__(self, corpus: str | Path, offsets: np.ndarray):
        self.corpus = _check_file(Path(corpus))
        self.offsets = offsets
        self._size = self.corpus.stat().st_size
        self._fd = os.open(self.corpus, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    @classmethod
    def build(cls, corpus: str | Path, out_dir: str | Path | None = None) -> tuple[PassageStore, list[str]]:
        """Scan the corpus once: the store (saved to ``out_dir`` if given) and each passage's indexed text."""
        corpus = _check_file(Path(corpus))
        offsets: list[int] = []
        texts: list[str] = []
        ids: set[str] = set()
        for offset, passage in iter_passages(corpus):
            if passage.id in ids:
                raise UserError(f"{corpus}: passage id {passage.id!r} occurs twice; ids must be unique")
            ids.add(passage.id)
            offsets.append(offset)
            texts.append(passage.contents())
        if not offsets:
            raise UserError(f"search corpus {corpus} holds no passages")
        store = cls(corpus, np.asarray(offsets, dtype=np.int64))
        if out_dir is not None:
            store.save(out_dir)
        return store, texts

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, self.offsets)
        atomic_write_bytes(out / OFFSETS_FILE, buf.getvalue())
        atomic_write_json(out / STORE_META, {**_fingerprint(self.corpus), "passages": len(self.offsets)})

    @classmethod
    def load(cls, index_dir: str | Path, corpus: str | Path | None = None) -> PassageStore:
        """Open a saved store (offsets memory-mapped); fails clearly if the corpus file changed since."""
        index_dir = Path(index_dir)
        meta_path = index_dir / STORE_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{index_dir}: no {STORE_META}; not a search index directory "
                                    "(build one with `memtrain serve-retriever --corpus FILE --index DIR`)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        path = Path(corpus) if corpus is not None else Path(meta["corpus"])
        path = _check_file(path)
        now = _fingerprint(path)
        if now["size"] != meta["size"]:
            raise UserError(f"search corpus {path} has changed since the index in {index_dir} was built "
                            f"({meta['size']} bytes then, {now['size']} now); rebuild the index")
        offsets = np.load(index_dir / OFFSETS_FILE, mmap_mode="r")
        return cls(path, offsets)

    def get(self, rows: Sequence[int]) -> list[Passage]:
        """The passages at these rows; positioned reads (``pread``), so threads can share one store."""
        out = []
        n = len(self.offsets)
        for row in rows:
            row = int(row)
            if not 0 <= row < n:
                raise IndexError(f"passage row {row} out of range (corpus has {n})")
            start = int(self.offsets[row])
            end = int(self.offsets[row + 1]) if row + 1 < n else self._size
            line = os.pread(self._fd, end - start, start)
            out.append(parse_passage(json.loads(line), f"{self.corpus}@{start}"))
        return out
