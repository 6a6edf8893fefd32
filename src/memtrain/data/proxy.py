"""Proxy task 1 data (docs/method.md section 2): masked-reconstruction documents built from Wikipedia
passages.

One document = a pivot passage with at least one usable entity + ``related`` passages retrieved by similarity
to it + random passages up to ``passages`` in all, shuffled, joined with ``Document i:`` headers; one entity
of the pivot is replaced everywhere in the document by ``[MASK]`` (the masking rule of
``memtrain.data.masking``) and is the answer. Each row also stores the spans of the usable entities of the
masked document (``entity_spans``), so intermediate-memory recall (section 3) can pick an entity inside any
chunk without running NER inside the RL loop.

Cost is kept down by doing each expensive thing once: the corpus is split into a memory-mapped passage
store, NER runs lazily only on passages that are drawn (cached per passage in SQLite), the retrieval index is
built once per corpus and retriever, and passage token counts are computed once and summed (the final
document is tokenized exactly once to confirm its length).

Determinism: pivots are visited in a seeded permutation of the passages; every choice made for the pivot at
position ``pos`` of epoch ``e`` uses its own generator seeded with ``(seed, e, pos)``. Caches only hold pure
functions of their keys, so the same inputs and seed give identical rows whatever is cached and however many
workers run.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memtrain import __version__
from memtrain.assets import home
from memtrain.data.corpus import PassageStore, SplitParams, open_store
from memtrain.data.dataset import check_output_dir, write_dataset
from memtrain.data.entities import Candidate, EntityTagger, candidates
from memtrain.data.leaks import find_leaks
from memtrain.data.masking import DEFAULT_MAX_MASKS, MaskedDocument, mask_document, span_texts
from memtrain.data.related import excluded_rows, open_index, related_passages
from memtrain.errors import UserError
from memtrain.io import check_writable
from memtrain.log import logger, progress_bar
from memtrain.models import load_tokenizer
from memtrain.prompts import PROXY_QUESTION
from memtrain.retrieval.index import BM25Index, DenseIndex

TASK = "proxy"
SPAN_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string())])
PROXY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("context", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("entity_label", pa.string()),
        ("pivot_title", pa.string()),
        ("num_passages", pa.int32()),
        ("num_tokens", pa.int32()),
        ("entity_spans", pa.list_(SPAN_TYPE)),
        ("num_masked", pa.int32()),
        ("num_variants_masked", pa.int32()),
        ("pivot_position", pa.int32()),
        ("num_related", pa.int32()),
        ("passage_ids", pa.list_(pa.int64())),
    ]
)
_WORD = re.compile(r"\w+")
_BLOCK = 64  # pivots planned together, so NER and retrieval run in batches
_MIN_TRIES_BEFORE_GIVING_UP = 100
_MIN_SUCCESS_RATE = 0.05


class ProxyConfig(BaseModel):
    """Everything ``memtrain data proxy`` takes (CLI flags or a YAML file with these keys)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    corpus: str = "wikipedia-vital"
    out: str | None = None
    num_docs: int = Field(1000, gt=0, description="documents to build (the paper used 30k)")
    passages: int = Field(150, gt=0, description="N: passages per document")
    related: int = Field(29, ge=0, description="n1: retrieved passages per document")
    retriever: Literal["dense", "bm25"] = "dense"
    embedder: str = "minilm"
    tokenizer: str = "smollm2-135m"
    min_tokens: int = Field(24000, ge=0)
    max_tokens: int = Field(40000, gt=0)
    seed: int = 42
    workers: int = Field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)), gt=0)
    ner_model: str | None = None
    entity_labels: list[str] | None = None
    max_entity_occurrences: int = Field(5, gt=1)
    max_entity_words: int = Field(8, gt=1)
    max_masks: int = Field(
        DEFAULT_MAX_MASKS,
        gt=0,
        description="most [MASK] replacements (variants included) per document; an entity needing more is "
        "not used, so the task stays long-range recall instead of local fill-in-the-blank",
    )
    text_field: str | None = None
    title_field: str | None = None
    max_passage_chars: int = Field(1500, gt=0)
    min_passage_chars: int = Field(50, gt=0)
    max_articles: int | None = Field(None, gt=0)
    shard_size: int = Field(1000, gt=0)
    cache_dir: str | None = None
    ner_batch_size: int = Field(256, gt=0)
    embed_batch_size: int = Field(32, gt=0)
    max_redraws: int = Field(10, ge=0)
    exclude_from: list[str] = Field(
        default_factory=list,
        description="proxy datasets whose articles this one must not use (a held-out set: no pivot, related "
        "or random passage comes from an article any of their documents drew on)",
    )
    overwrite: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ProxyConfig:
        if self.related > self.passages - 1:
            raise UserError(
                f"related={self.related} must be below passages={self.passages} (the pivot takes a slot)"
            )
        if self.min_tokens > self.max_tokens:
            raise UserError(f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}")
        if self.max_passage_chars < 2 * self.min_passage_chars:
            raise UserError(
                f"max_passage_chars={self.max_passage_chars} must be at least twice "
                f"min_passage_chars={self.min_passage_chars}"
            )
        return self


def default_cache_dir() -> Path:

    return home() / "cache"


class TokenCounter:
    """Policy-tokenizer token counts: per passage (computed once, lazily) and for whole documents."""

    def __init__(self, tokenizer: Any, store: PassageStore):
        self.tokenizer = tokenizer
        self.store = store
        self.counts = np.full(len(store), -1, dtype=np.int64)
        self._headers: list[int] = [0]
        self.seconds = 0.0

    def _lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def rows(self, rows: list[int]) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64)
        missing = sorted({int(r) for r in idx[self.counts[idx] < 0]})
        if missing:
            start = time.time()
            self.counts[missing] = self._lengths(self.store.texts(missing))
            self.seconds += time.time() - start
        return self.counts[idx]

    def text(self, text: str) -> int:
        start = time.time()
        n = self._lengths([text])[0]
        self.seconds += time.time() - start
        return n

    def headers(self, k: int) -> int:
        """Estimated tokens that ``k`` "Document i:" headers and blank-line separators add."""
        while len(self._headers) <= k:
            i = len(self._headers)
            sep = "\n\n" if i > 1 else ""
            self._headers.append(self._headers[-1] + self._lengths([f"{sep}Document {i}:\n"])[0])
        return self._headers[k]


@dataclass
class _Draw:
    """One pivot drawn from the permutation, with its usable entities and its own generator."""

    epoch: int
    pos: int
    row: int
    cands: list[Candidate]
    rng: np.random.Generator
    related: list[int] = field(default_factory=list)
    randoms: list[int] = field(default_factory=list)


def check_feasible(cfg: ProxyConfig, store: PassageStore, counter: TokenCounter) -> dict[str, float]:
    """Fail early, with numbers, when the corpus cannot give documents in the requested token range."""
    n = len(store)
    if n < cfg.passages:
        raise UserError(
            f"corpus {cfg.corpus!r} has {n} passages, but --passages {cfg.passages} needs at least "
            "that many distinct passages per document"
        )
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    sample = sorted(int(r) for r in rng.choice(n, size=min(n, 2000), replace=False))
    mean = float(counter.rows(sample).mean())
    per_doc = cfg.passages * mean + counter.headers(cfg.passages)
    if per_doc < cfg.min_tokens:
        need = math.ceil(cfg.min_tokens / (per_doc / cfg.passages))
        raise UserError(
            f"documents of {cfg.passages} passages from corpus {cfg.corpus!r} have about {per_doc:.0f} "
            "tokens "
            f"(mean passage: {mean:.0f} tokens with {cfg.tokenizer}), below --min-tokens {cfg.min_tokens}; "
            f"use about --passages {need} or a lower --min-tokens"
        )
    return {"mean_passage_tokens": round(mean, 1), "expected_doc_tokens": round(per_doc, 1)}


class ProxyBuilder:
    """Turns a passage store, an entity tagger, a retrieval index and a token counter into proxy rows."""

    def __init__(
        self,
        cfg: ProxyConfig,
        store: PassageStore,
        tagger: EntityTagger,
        index: BM25Index | DenseIndex,
        counter: TokenCounter,
        excluded: np.ndarray | None = None,
    ):
        self.cfg = cfg
        # rows no document may use (held-out sets: every passage of an article another dataset drew on)
        self.excluded = excluded
        self.store = store
        self.tagger = tagger
        self.index = index
        self.counter = counter
        self.counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # pivot NER spans repaired or rejected as broken, by reason
        self.labels: Counter[str] = Counter()
        self.tokens: list[int] = []
        self.masks: list[int] = []  # [MASK] replacements per finished document
        self.variants_masked: list[int] = []  # ... of them variants (surname, punctuation, contained spans)
        self.leaked_docs = 0
        self.epochs = 1
        self.retrieval_seconds = 0.0

    def _excluded(self, row: int) -> bool:
        return self.excluded is not None and bool(self.excluded[row])

    # -------------------------------------------------------------------------------------------- pivots

    def _pivots(self) -> Iterator[_Draw]:
        """Pivots with at least one usable entity, in seeded-permutation order (epochs when reused)."""
        n = len(self.store)
        epoch, pos = 0, 0
        perm = np.random.default_rng([self.cfg.seed, 0]).permutation(n)
        found_this_epoch = 0
        while True:
            if pos >= n:
                if found_this_epoch == 0:
                    excluded = int(self.excluded.sum()) if self.excluded is not None else 0
                    raise UserError(
                        f"no passage of corpus {self.cfg.corpus!r} has a usable entity (NER model "
                        f"{self.tagger.model!r}, labels {self.cfg.entity_labels or 'any'}"
                        + (f"; {excluded} of {n} passages excluded by --exclude-from" if excluded else "")
                        + ")"
                    )
                epoch, pos, found_this_epoch = epoch + 1, 0, 0
                self.epochs = epoch + 1
                perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
                logger.warning(
                    "every passage has been a pivot candidate; reusing pivots (epoch %d)", epoch + 1
                )
            chunk = [int(r) for r in perm[pos : pos + _BLOCK]]
            ents = self.tagger(chunk)
            texts = self.store.texts(chunk)
            for row, text in zip(chunk, texts, strict=True):
                pos += 1
                if self._excluded(row):
                    self.skipped["pivot_from_excluded_article"] += 1
                    continue
                self.counts["pivot_candidates"] += 1
                cands = candidates(
                    text,
                    ents[row],
                    self.cfg.max_entity_occurrences,
                    self.cfg.max_entity_words,
                    self.cfg.entity_labels,
                    rejected=self.rejected,
                )
                if not cands:
                    self.skipped["pivot_without_usable_entity"] += 1
                    continue
                found_this_epoch += 1
                yield _Draw(
                    epoch, pos - 1, row, cands, np.random.default_rng([self.cfg.seed, epoch, pos - 1])
                )

    # -------------------------------------------------------------------------------------------- passages

    def _related(self, draws: list[_Draw]) -> None:
        if self.cfg.related == 0:
            return
        start = time.time()
        pivots = [d.row for d in draws]
        found = related_passages(self.index, self.store, pivots, self.cfg.related, self.excluded)
        for d, rel in zip(draws, found, strict=True):
            d.related = rel
            self.counts["related_shortfall"] += self.cfg.related - len(rel)
        self.retrieval_seconds += time.time() - start

    def _draw_random(self, d: _Draw, need: int) -> list[int]:
        """``need`` distinct random passages, none equal (in row or text) to the pivot or related ones."""
        n = len(self.store)
        taken = {d.row, *d.related}
        seen = set(self.store.texts(sorted(taken)))
        out: list[int] = []
        for _ in range(20):
            if len(out) >= need:
                return out
            size = min(n, need - len(out) + len(taken) + 8)
            draw = [int(r) for r in d.rng.choice(n, size=size, replace=False)
                    if int(r) not in taken and not self._excluded(int(r))]
            for r, t in zip(draw, self.store.texts(draw), strict=True):
                if len(out) < need and t not in seen:
                    out.append(r)
                    taken.add(r)
                    seen.add(t)
        if len(out) < need:
            raise UserError(
                f"corpus {self.cfg.corpus!r}: could not find {self.cfg.passages} distinct passages for "
                f"one document ({len(taken)} found); the corpus is too small or too repetitive"
            )
        return out

    def _plan(self, d: _Draw) -> str | None:
        """Draw the random passages and drop passages (random ones first, never the pivot) until the estimated
        length is within the maximum. Returns a skip reason, or None when the plan fits."""
        d.randoms = self._draw_random(d, self.cfg.passages - 1 - len(d.related))
        related = list(d.related)
        rows = [d.row, *related, *d.randoms]
        est = int(self.counter.rows(rows).sum()) + self.counter.headers(len(rows))
        while est > self.cfg.max_tokens:
            pool = d.randoms if d.randoms else related
            if not pool:
                return "pivot_longer_than_max_tokens"
            dropped = pool.pop(int(d.rng.integers(len(pool))))
            est -= int(self.counter.rows([dropped])[0])
            est -= self.counter.headers(len(related) + len(d.randoms) + 2) - self.counter.headers(
                len(related) + len(d.randoms) + 1
            )
            self.counts["passages_dropped_for_length"] += 1
        d.related = related
        return "short" if est < self.cfg.min_tokens else None

    # -------------------------------------------------------------------------------------------- documents

    def _arrange(self, d: _Draw, rng: np.random.Generator) -> tuple[list[int], list[Candidate]]:
        """Shuffled passage order and the order in which the pivot's candidates are tried."""
        rows = [d.row, *d.related, *d.randoms]
        order = [rows[i] for i in rng.permutation(len(rows))]
        return order, [d.cands[i] for i in rng.permutation(len(d.cands))]

    def _build(
        self, order: list[int], cand_order: list[Candidate]
    ) -> tuple[Candidate, MaskedDocument] | None:
        """The first candidate whose masked document passes the masking checks, with that document."""
        ents = self.tagger(order)
        texts = self.store.texts(order)
        others = span_texts(order, texts, ents)
        for cand in cand_order:
            built = mask_document([ents[row] for row in order], texts, cand.text, cand.label, others,
                                  self.cfg.max_masks, self.cfg.max_entity_words, self.cfg.entity_labels)
            if not isinstance(built, str):
                return cand, built
            self.counts[f"candidates_rejected_{built}"] += 1
        return None

    def _document(self, d: _Draw, status: str | None) -> dict[str, Any] | str:
        """The finished row for one planned pivot, or the reason it was skipped. A document that ends up
        shorter than ``min_tokens`` gets new random passages, at most ``max_redraws`` times."""
        redraws = 0
        while True:
            if status == "short":
                if redraws >= self.cfg.max_redraws:
                    return "shorter_than_min_tokens"
                redraws += 1
                self.counts["redraws"] += 1
                status = self._plan(d)
                continue
            if status is not None:
                return status
            related, randoms = list(d.related), list(d.randoms)
            order, cand_order = self._arrange(d, d.rng)
            while True:
                found = self._build(order, cand_order)
                if found is None:
                    return "no_entity_passes_masking_check"
                cand, (doc, spans, masked, variants, variants_masked) = found[0], found[1].astuple()
                ntok = self.counter.text(doc)
                if ntok <= self.cfg.max_tokens or len(order) == 1:
                    break
                pool = [r for r in order if r in randoms] or [r for r in order if r != d.row]
                drop = pool[int(d.rng.integers(len(pool)))]
                order.remove(drop)
                (randoms if drop in randoms else related).remove(drop)
                self.counts["passages_dropped_for_length"] += 1
            if ntok > self.cfg.max_tokens:
                return "pivot_longer_than_max_tokens"
            if ntok < self.cfg.min_tokens:
                status = "short"
                continue
            # the dataset's leak rate: every finished document is checked once more, as it will be stored
            self.leaked_docs += bool(find_leaks(doc, cand.text, variants))
            self.masks.append(masked)
            self.variants_masked.append(variants_masked)
            self.counts["answers_determiner_stripped"] += bool(cand.determiner)
            return {
                "context": doc,
                "question": PROXY_QUESTION,
                "answers": [cand.text],
                "entity_label": cand.label,
                "pivot_title": self.store.title(d.row),
                "num_passages": len(order),
                "num_tokens": ntok,
                "entity_spans": spans,
                "num_masked": masked,
                "num_variants_masked": variants_masked,
                "pivot_position": order.index(d.row) + 1,
                "num_related": len(related),
                "passage_ids": order,
            }

    def rows(self) -> Iterator[dict[str, Any]]:
        """Generate ``num_docs`` rows (ids ``proxy-<seed>-<i>``), planning pivots in blocks."""
        made = tried = 0
        pivots = self._pivots()
        bar = progress_bar("proxy documents", total=self.cfg.num_docs, unit="doc")
        try:
            while made < self.cfg.num_docs:
                block = [next(pivots) for _ in range(min(_BLOCK, self.cfg.num_docs - made))]
                self._related(block)
                plans = [(d, self._plan(d)) for d in block]
                ready = [d for d, status in plans if status is None]
                self.tagger([r for d in ready for r in (d.row, *d.related, *d.randoms)])
                for d, status in plans:
                    tried += 1
                    result = self._document(d, status)
                    if isinstance(result, str):
                        self.skipped[result] += 1
                        continue
                    result = {"id": f"proxy-{self.cfg.seed}-{made:06d}", **result}
                    made += 1
                    bar.update(1)
                    self.labels[result["entity_label"]] += 1
                    self.tokens.append(result["num_tokens"])
                    yield result
                if tried >= _MIN_TRIES_BEFORE_GIVING_UP and made < _MIN_SUCCESS_RATE * tried:
                    raise UserError(
                        f"only {made} of {tried} pivots gave a document (skipped: "
                        f"{dict(self.skipped)}); widen --min-tokens/--max-tokens or change --passages"
                    )
        finally:
            bar.close()
        self.counts["documents"] = made
        self.counts["pivots_tried"] = tried

    def report(self) -> dict[str, Any]:
        toks = np.asarray(self.tokens or [0])
        return {
            "counts": dict(sorted(self.counts.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "broken_spans": dict(sorted(self.rejected.items())),
            "pivot_epochs": self.epochs,
            "entity_label_counts": dict(self.labels.most_common()),
            "token_stats": {
                "min": int(toks.min()),
                "mean": round(float(toks.mean()), 1),
                "max": int(toks.max()),
            },
            "masking": {
                "max_masks": self.cfg.max_masks,
                "masks_per_doc": distribution(self.masks),
                "variants_masked_per_doc": distribution(self.variants_masked),
                "docs_with_variants_masked": sum(v > 0 for v in self.variants_masked),
                "answers_determiner_stripped": self.counts["answers_determiner_stripped"],
                "leaked_docs": self.leaked_docs,
                "leak_rate": self.leaked_docs / max(len(self.masks), 1),
            },
        }


def distribution(values: list[int]) -> dict[str, Any]:
    """min / mean / max and a value -> count histogram of small integers (JSON keys are strings)."""
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0, "histogram": {}}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values),
            "histogram": {str(k): v for k, v in sorted(Counter(values).items())}}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"memtrain": __version__}
    for pkg in ("spacy", "sentence-transformers", "faiss-cpu", "bm25s", "transformers", "pyarrow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _manifest(cfg: ProxyConfig, store: PassageStore, tagger: EntityTagger,
              builder: ProxyBuilder) -> dict[str, Any]:
    """What a finished build records besides its timings: inputs, models, NER cache, the builder's counts."""
    return {
        "corpus": {"spec": cfg.corpus, "store": str(store.directory), **store.meta},
        "params": cfg.model_dump(mode="json"),
        "models": {
            "ner": {k: v for k, v in tagger.fingerprint.items() if k != "files"},
            "retriever": cfg.retriever,
            "embedder": cfg.embedder if cfg.retriever == "dense" else None,
            "tokenizer": cfg.tokenizer,
        },
        "ner_cache": {
            "file": str(tagger.cache.path) if tagger.cache else None,
            "passages_tagged_now": tagger.tagged,
            "cache_hits": tagger.cache_hits,
        },
        **builder.report(),
        "versions": _versions(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def build_proxy_dataset(cfg: ProxyConfig) -> dict[str, Any]:
    """Build the dataset described by ``cfg`` into ``cfg.out``; returns the manifest written there."""

    if not cfg.out:
        raise UserError("no output directory: pass --out DIR (or `out:` in the config file)")
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    check_writable(out.parent, f"--out {out}: directory")  # before the corpus and index load (minutes)
    wall = time.time()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    timings: dict[str, float] = {}

    start = time.time()
    store = open_store(
        cfg.corpus,
        cache,
        cfg.text_field,
        cfg.title_field,
        SplitParams(cfg.max_passage_chars, cfg.min_passage_chars),
        cfg.max_articles,
    )
    timings["corpus_s"] = time.time() - start
    counter = TokenCounter(load_tokenizer(cfg.tokenizer), store)
    tagger = EntityTagger(
        store.texts, store.key, cfg.ner_model, cache / "ner", cfg.workers, cfg.ner_batch_size
    )
    try:
        feasibility = check_feasible(cfg, store, counter)
        start = time.time()
        index, index_dir, reused = open_index(store, cfg, cache)
        timings["index_s"] = time.time() - start
        excluded, exclusion = excluded_rows(store, cfg.exclude_from) if cfg.exclude_from else (None, None)
        builder = ProxyBuilder(cfg, store, tagger, index, counter, excluded)
        start, tok_before = time.time(), counter.seconds

        def info() -> dict[str, Any]:
            tokenize_s = counter.seconds - tok_before
            # generation time that is not NER, token counting or retrieval: sampling, masking, spans, parquet
            timings["sampling_s"] = (
                time.time() - start - tagger.seconds - tokenize_s - builder.retrieval_seconds
            )
            timings.update(ner_s=tagger.seconds, tokenize_s=tokenize_s, retrieval_s=builder.retrieval_seconds)
            index_info = {"dir": str(index_dir), "reused": reused, "size": len(index)}
            return {**_manifest(cfg, store, tagger, builder), "feasibility": feasibility,
                    "excluded": exclusion, "index": index_info,
                    "timings_s": {k: round(v, 2) for k, v in timings.items()},
                    "wall_time_s": round(time.time() - wall, 2)}

        manifest = write_dataset(out, builder.rows(), PROXY_SCHEMA, TASK, info, cfg.shard_size, cfg.overwrite)
    finally:
        tagger.close()
    logger.info("wrote %d proxy documents to %s in %.1fs", manifest["num_rows"], out, manifest["wall_time_s"])
    return manifest
