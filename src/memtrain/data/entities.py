r"""Named entities of passages (spaCy, NER-only, cached on disk) and the candidate answers among them; the
masking rule that hides a candidate is :mod:`memtrain.data.masking`.

Candidate filters (docs/method.md section 2, reference scripts): fewer than ``max_occurrences`` (5) matches in
the passage, fewer than ``max_words`` (8) words, at least one letter or digit, not all lower-case letters, no
square brackets (so entities never collide with placeholders), optional label allow-list; de-duplicated
case-insensitively, the first surface form kept as the answer.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrain.assets import resolve
from memtrain.data.masking import Span, count_matches, entity_span, is_usable, normalize_spans, repaired_span
from memtrain.errors import UserError
from memtrain.log import logger

ENTITY_FACTORIES = ("ner", "beam_ner", "entity_ruler", "span_ruler")


# ----------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    text: str
    label: str
    start: int
    end: int
    determiner: str = ""  # the leading determiner NER had put in the span ("the"), stripped from ``text``


def candidates(
    text: str,
    spans: Iterable[Span],
    max_occurrences: int = 5,
    max_words: int = 8,
    labels: Iterable[str] | None = None,
    rejected: Counter[str] | None = None,
) -> list[Candidate]:
    """Usable entities of one passage, determiners stripped, broken NER spans repaired or rejected
    (:func:`repaired_span`; counted by reason into ``rejected``), de-duplicated case-insensitively (first
    surface form kept)."""
    allowed = set(labels) if labels is not None else None
    seen: set[str] = set()
    out: list[Candidate] = []
    for span in spans:
        s, e, label = entity_span(text, span)
        determiner = text[span[0]:s].strip()
        fixed = repaired_span(text, s, e)
        if isinstance(fixed, str):
            if rejected is not None:
                rejected[f"broken_span_{fixed}"] += 1
            continue
        if rejected is not None and fixed != (s, e):
            rejected["broken_span_repaired"] += 1
        s, e = fixed
        ent = text[s:e]
        key = " ".join(ent.casefold().split())
        if key in seen:
            continue
        seen.add(key)
        if not is_usable(ent, label, max_words, allowed):
            continue
        if count_matches(text, ent) >= max_occurrences:
            continue
        out.append(Candidate(ent, label, s, e, determiner))
    return out


# ----------------------------------------------------------------------------------------------- spaCy


def default_ner_model() -> str:
    """The official ``en_core_web_sm`` where installed, else the embedded re-upload ``spacy-sm``."""
    import spacy.util

    return "en_core_web_sm" if spacy.util.is_package("en_core_web_sm") else "spacy-sm"


def load_ner(model: str | None = None) -> Any:
    """A spaCy pipeline that only runs what sets ``doc.ents``: the ner/entity_ruler components and the
    tok2vec components they listen to (en_core_web_sm's ner has its own embedding, so tok2vec goes too)."""
    import spacy

    name = model or default_ner_model()
    path = resolve(name, kind="ner")
    try:
        nlp = spacy.load(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"NER model {name!r}: cannot load it with spacy.load ({exc}); expected an installed "
            "spaCy package (e.g. en_core_web_sm), a spaCy model directory or 'spacy-sm'"
        ) from None
    keep = {n for n in nlp.pipe_names if nlp.get_pipe_meta(n).factory in ENTITY_FACTORIES}
    if not keep:
        raise UserError(
            f"NER model {name!r} has no entity component (pipes: {', '.join(nlp.pipe_names) or 'none'});"
            f" expected one of {', '.join(ENTITY_FACTORIES)}"
        )
    for n, comp in nlp.pipeline:
        listeners = getattr(comp, "listener_map", {}) or {}
        if any(k in keep for k in listeners):
            keep.add(n)
    nlp.select_pipes(enable=[n for n in nlp.pipe_names if n in keep])
    return nlp


def model_fingerprint(model: str | None) -> dict[str, Any]:
    """What identifies the NER model's output without loading it: name, version, and for a directory the
    sizes and mtimes of its files (so a rebuilt model in the same place is not confused with the old one)."""
    import spacy.util

    name = model or default_ner_model()
    path = Path(resolve(name, kind="ner")).expanduser()
    if path.is_dir():
        meta = path / "meta.json"
        info = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        files = sorted(
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in path.rglob("*")
            if p.is_file()
        )
        return {
            "name": name,
            "path": str(path.resolve()),
            "spacy_name": f"{info.get('lang')}_{info.get('name')}",
            "version": info.get("version"),
            "files": files,
        }
    version = spacy.util.get_package_version(name)
    if version is None:
        raise UserError(f"NER model {name!r}: not an installed spaCy package nor a directory")
    return {"name": name, "version": version}


class EntityCache:
    """Entities per passage row in SQLite (WAL): incremental, safe to interrupt, shared between runs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._damaged_is_an_error():
            self._db = sqlite3.connect(str(self.path))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS ents (row INTEGER PRIMARY KEY, spans TEXT NOT NULL)")
            self._db.commit()

    @contextmanager
    def _damaged_is_an_error(self) -> Iterator[None]:
        """A damaged cache file is a one-line error naming it (it only caches NER output: safe to delete)."""
        try:
            yield
        except (sqlite3.DatabaseError, json.JSONDecodeError, ValueError) as exc:
            raise UserError(f"NER cache {self.path} is damaged ({exc}); delete it, it is rebuilt on the "
                            "next run") from None

    def get(self, rows: Sequence[int]) -> dict[int, list[Span]]:
        out: dict[int, list[Span]] = {}
        with self._damaged_is_an_error():
            for i in range(0, len(rows), 900):
                part = [int(r) for r in rows[i : i + 900]]
                q = f"SELECT row, spans FROM ents WHERE row IN ({','.join('?' * len(part))})"
                for row, blob in self._db.execute(q, part):
                    out[row] = [(s, e, lab) for s, e, lab in json.loads(blob)]
        return out

    def put(self, entities: dict[int, list[Span]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO ents (row, spans) VALUES (?, ?)",
                [(int(r), json.dumps(v, separators=(",", ":"))) for r, v in entities.items()],
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM ents").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class EntityTagger:
    """Entities of passage rows, computed lazily: memory, then the on-disk cache, then spaCy for the rest.

    ``texts_of(rows)`` supplies passage texts (a ``PassageStore.texts``); the cache file is keyed by
    ``corpus_key`` and the model fingerprint, so a rebuild of the same corpus never re-runs NER.
    """

    def __init__(
        self,
        texts_of: Any,
        corpus_key: str,
        model: str | None = None,
        cache_dir: Path | None = None,
        workers: int = 1,
        batch_size: int = 256,
        min_parallel: int = 1000,
    ):
        self.texts_of = texts_of
        self.model = model or default_ner_model()
        self.fingerprint = model_fingerprint(self.model)
        digest = hashlib.sha256(
            json.dumps([corpus_key, self.fingerprint], sort_keys=True).encode()
        ).hexdigest()[:20]
        self.cache = EntityCache(Path(cache_dir) / f"ner-{digest}.sqlite") if cache_dir is not None else None
        self.workers = max(1, workers)
        self.batch_size = batch_size
        self.min_parallel = min_parallel
        self._nlp: Any = None
        self._mem: dict[int, list[Span]] = {}
        self.tagged = 0
        self.cache_hits = 0
        self.seconds = 0.0

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            self._nlp = load_ner(self.model)
        return self._nlp

    def _run(self, texts: list[str]) -> list[list[Span]]:
        n_process = self.workers if len(texts) >= self.min_parallel else 1
        out: list[list[Span]] = []
        for text, doc in zip(
            texts, self.nlp.pipe(texts, batch_size=self.batch_size, n_process=n_process), strict=True
        ):
            out.append(normalize_spans(text, ((e.start_char, e.end_char, e.label_) for e in doc.ents)))
        return out

    def __call__(self, rows: Iterable[int]) -> dict[int, list[Span]]:
        wanted = sorted({int(r) for r in rows})
        missing = [r for r in wanted if r not in self._mem]
        if missing and self.cache is not None:
            found = self.cache.get(missing)
            self.cache_hits += len(found)
            self._mem.update(found)
            missing = [r for r in missing if r not in found]
        if missing:
            start = time.time()
            texts = self.texts_of(missing)
            fresh = dict(zip(missing, self._run(texts), strict=True))
            if self.cache is not None:
                self.cache.put(fresh)
            self._mem.update(fresh)
            self.tagged += len(missing)
            self.seconds += time.time() - start
            logger.debug("NER on %d passages in %.1fs", len(missing), time.time() - start)
        return {r: self._mem[r] for r in wanted}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
