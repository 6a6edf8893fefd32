"""Corpora of articles, split into passages and stored once on disk for random access.

A corpus SPEC is one of:

- ``wikipedia-vital``: the embedded 10k-article Wikipedia corpus (see ``memtrain.assets``);
- a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file, or a directory of them (searched
  recursively, in sorted order). Records carry the text in ``text_field`` (default ``text``) and optionally a
  title in ``title_field`` (default ``title``); a ``.txt`` file is one article titled by its file name;
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset, streamed through the optional ``datasets`` package.

Articles are read as a stream and split into passages (paragraphs; short lines such as headings are merged
into the next line, over-long paragraphs are split at sentence ends), which are written in batches into an
Arrow IPC file in the cache, keyed by the corpus fingerprint and splitting parameters. The proxy builder then
memory-maps it, so a multi-GB dump is read once and never has to fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from memtrain.assets import resolve
from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger, progress

EMBEDDED_CORPORA = {"wikipedia-vital": ("extract", "title")}
SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
STORE_FORMAT = 1  # bump when splitting changes, so old passage stores are not reused
PASSAGES_FILE = "passages.arrow"
_BATCH = 8192
_TXT_BLOCK_CHARS = 1 << 16
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    source: str  # file (and line) or dataset it came from, for error messages


@dataclass(frozen=True)
class SplitParams:
    """How articles become passages: paragraphs of at most ``max_chars``, lines under ``min_chars`` merged."""

    max_chars: int = 1500
    min_chars: int = 50

    def __post_init__(self) -> None:
        if self.min_chars < 1 or self.max_chars < 2 * self.min_chars:
            raise UserError(
                f"passage lengths: expected 1 <= min_chars and max_chars >= 2 * min_chars, got "
                f"min_chars={self.min_chars}, max_chars={self.max_chars}"
            )


@dataclass
class ReadStats:
    """What reading and splitting the corpus did, including everything skipped and why."""

    articles: int = 0
    passages: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "articles": self.articles,
            "passages": self.passages,
            "skipped": dict(sorted(self.skipped.items())),
        }


# ----------------------------------------------------------------------------------------------- readers


def corpus_files(path: Path) -> list[Path]:
    """The corpus files under ``path`` (itself if a file), sorted so the passage order is reproducible."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(
                f"corpus file {path}: unsupported type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
            )
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"corpus directory {path} has no {'/'.join(SUFFIXES)} files")
        return files
    raise FileNotFoundError(
        f"corpus {str(path)!r} not found: expected the embedded name 'wikipedia-vital', a "
        "file or directory of .jsonl/.json/.parquet/.txt articles, or hf:NAME[:CONFIG][:SPLIT]"
    )


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where}: not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "expected UTF-8 text (re-encode the file, e.g. with iconv -t utf-8)"
        ) from None


def _record_article(
    rec: Any, where: str, text_field: str, title_field: str, default_title: str, stats: ReadStats
) -> Article | None:
    if not isinstance(rec, dict):
        raise UserError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(rec).__name__}"
        )
    if text_field not in rec:
        keys = ", ".join(map(str, list(rec)[:12])) or "none"
        raise UserError(
            f"{where}: no text field {text_field!r} (fields: {keys}); choose it with --text-field"
        )
    text = rec[text_field]
    if text is None or (isinstance(text, str) and not text.strip()):
        stats.skipped["empty_article"] += 1
        return None
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    title = rec.get(title_field)
    return Article(str(title) if title is not None else default_title, text, where)


def _read_jsonl(path: Path, text_field: str, title_field: str, stats: ReadStats) -> Iterator[Article]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line"
                ) from None
            art = _record_article(rec, where, text_field, title_field, f"{path.stem}:{lineno}", stats)
            if art is not None:
                yield art


def _read_json(path: Path, text_field: str, title_field: str, stats: ReadStats) -> Iterator[Article]:
    """A JSON list of records, or a dict {key: record} (the key is the default title). Loaded whole."""
    try:
        data = json.loads(_decode(path.read_bytes(), str(path)))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected a list of "
            "records or a {title: record} object (use .jsonl for large corpora)"
        ) from None
    if isinstance(data, list):
        items: Sequence[tuple[str, Any]] = [(f"{path.stem}:{i}", rec) for i, rec in enumerate(data)]
    elif isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    else:
        raise UserError(
            f"{path}: expected a JSON list of records or a {{title: record}} object, got "
            f"{type(data).__name__}"
        )
    for key, rec in items:
        art = _record_article(rec, f"{path} [{key!r}]", text_field, title_field, key, stats)
        if art is not None:
            yield art


def _read_parquet(path: Path, text_field: str, title_field: str, stats: ReadStats) -> Iterator[Article]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(
            f"{path}: no text column {text_field!r} (columns: {', '.join(names)}); "
            "choose it with --text-field"
        )
    text_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UserError(f"{path}: column {text_field!r} must hold strings, it holds {text_type}")
    columns = [text_field] + ([title_field] if title_field in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        texts = batch.column(0).to_pylist()
        titles = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
        for text, title in zip(texts, titles, strict=True):
            row += 1
            if text is None or not text.strip():
                stats.skipped["empty_article"] += 1
                continue
            yield Article(
                str(title) if title is not None else f"{path.stem}:{row}", text, f"{path} row {row}"
            )


def _read_txt(path: Path, stats: ReadStats) -> Iterator[Article]:
    """One article per file, streamed in blocks that end at blank lines, so huge files stay out of RAM."""
    buf: list[str] = []
    size = 0
    yielded = False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, f"{path}:{lineno}")
            buf.append(line)
            size += len(line)
            if size >= _TXT_BLOCK_CHARS and not line.strip():
                yield Article(path.stem, "".join(buf), f"{path}:{lineno}")
                buf, size, yielded = [], 0, True
    text = "".join(buf)
    if text.strip():
        yield Article(path.stem, text, str(path))
    elif not yielded:
        stats.skipped["empty_article"] += 1


def _read_hf(spec: str, text_field: str, title_field: str, stats: ReadStats) -> Iterator[Article]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(
            f"corpus {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikimedia/wikipedia:20231101.en"
        )
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 and parts[1] else None),
        (parts[2] if len(parts) > 2 and parts[2] else "train"),
    )
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"corpus {spec!r} needs the optional `datasets` package: pip install 'memtrain[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # the hub, auth and config errors all surface here
        raise UserError(
            f"corpus {spec!r}: could not open the dataset ({type(exc).__name__}: {exc})"
        ) from None
    for i, rec in enumerate(ds):
        art = _record_article(rec, f"{spec} row {i}", text_field, title_field, f"{name}:{i}", stats)
        if art is not None:
            yield art


def field_defaults(spec: str, text_field: str | None, title_field: str | None) -> tuple[str, str]:
    """The text/title fields to read: explicit ones win; the embedded corpus has its own names."""
    emb_text, emb_title = EMBEDDED_CORPORA.get(spec, ("text", "title"))
    return text_field or emb_text, title_field or emb_title


def iter_articles(
    spec: str, text_field: str | None = None, title_field: str | None = None, stats: ReadStats | None = None
) -> Iterator[Article]:
    """Stream the articles of a corpus SPEC (see the module docstring); skips are counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    tf, tl = field_defaults(spec, text_field, title_field)
    if spec.startswith("hf:"):
        yield from _read_hf(spec, tf, tl, stats)
        return
    path = Path(resolve(spec, kind="corpus") if spec in EMBEDDED_CORPORA else spec).expanduser()
    for f in corpus_files(path):
        suffix = f.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _read_jsonl(f, tf, tl, stats)
            elif suffix == ".json":
                yield from _read_json(f, tf, tl, stats)
            elif suffix == ".parquet":
                yield from _read_parquet(f, tf, tl, stats)
            else:
                yield from _read_txt(f, stats)
        except PermissionError as exc:
            raise UserError(f"corpus file {f}: not readable ({exc.strerror})") from None


# ----------------------------------------------------------------------------------------------- splitting


def _split_long(paragraph: str, max_chars: int, min_chars: int) -> list[str]:
    """Pack whole sentences into pieces of at most ``max_chars`` (cut longer sentences at spaces); a last
    piece under ``min_chars`` joins the one before it."""
    pieces: list[str] = []
    cur = ""
    for sent in _SENTENCE_END.split(paragraph):
        while len(sent) > max_chars:
            cut = sent.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            head, sent = sent[:cut].rstrip(), sent[cut:].lstrip()
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(head)
        if not sent:
            continue
        if cur and len(cur) + 1 + len(sent) > max_chars:
            pieces.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}" if cur else sent
    if cur:
        pieces.append(cur)
    if len(pieces) > 1 and len(pieces[-1]) < min_chars:
        tail = pieces.pop()
        pieces[-1] = f"{pieces[-1]} {tail}"
    return pieces


def split_passages(text: str, params: SplitParams = SplitParams()) -> list[str]:
    """Article -> passages: one per paragraph (line), whitespace normalised; a line shorter than
    ``min_chars`` (a heading, a broken line) is joined to the next one (the last one to the previous);
    paragraphs over ``max_chars`` are split at sentence ends. Passages are therefore at most
    ``max_chars + min_chars`` long. An article shorter than ``min_chars`` in total gives no passage."""
    paragraphs: list[str] = []
    buf: list[str] = []
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        if buf and sum(map(len, buf)) + len(buf) - 1 >= params.min_chars:
            paragraphs.append("\n".join(buf))
            buf = []
        buf.append(line)
    tail = ""
    if buf:
        last = "\n".join(buf)
        if len(last) >= params.min_chars:
            paragraphs.append(last)
        elif paragraphs:
            tail = last
    out: list[str] = []
    for p in paragraphs:
        out.extend(_split_long(p, params.max_chars, params.min_chars) if len(p) > params.max_chars else [p])
    if tail:
        out[-1] = f"{out[-1]}\n{tail}"
    return out


# ----------------------------------------------------------------------------------------------- store


def _fingerprint(spec: str) -> list[Any]:
    """What identifies the corpus content cheaply: path, size and mtime of every file (or the hub spec)."""
    if spec.startswith("hf:"):
        return [spec]
    path = Path(resolve(spec, kind="corpus") if spec in EMBEDDED_CORPORA else spec).expanduser()
    out: list[Any] = []
    for f in corpus_files(path):
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def store_key(
    spec: str, text_field: str | None, title_field: str | None, params: SplitParams, max_articles: int | None
) -> str:
    tf, tl = field_defaults(spec, text_field, title_field)
    blob = json.dumps(
        {
            "format": STORE_FORMAT,
            "spec": spec,
            "files": _fingerprint(spec),
            "text_field": tf,
            "title_field": tl,
            "split": asdict(params),
            "max_articles": max_articles,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_SCHEMA = pa.schema([("text", pa.large_string()), ("title", pa.large_string()), ("article", pa.int64())])


class PassageStore:
    """Passages of one corpus in a memory-mapped Arrow file: ``text(i)``, ``texts(rows)``, ``title(i)``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        source = pa.memory_map(str(self.directory / PASSAGES_FILE))
        self.table = pa.ipc.open_file(source).read_all()
        self._text = self.table.column("text")
        self._title = self.table.column("title")

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    def __len__(self) -> int:
        return self.table.num_rows

    def texts(self, rows: Sequence[int]) -> list[str]:
        return self._text.take(pa.array(rows, type=pa.int64())).to_pylist() if len(rows) else []

    def titles(self, rows: Sequence[int]) -> list[str]:
        return self._title.take(pa.array(rows, type=pa.int64())).to_pylist() if len(rows) else []

    def text(self, row: int) -> str:
        return self.texts([row])[0]

    def title(self, row: int) -> str:
        return self.titles([row])[0]

    def all_texts(self) -> list[str]:
        return self._text.to_pylist()

    def articles(self, rows: Sequence[int]) -> list[int]:
        return self.table.column("article").take(pa.array(rows, type=pa.int64())).to_pylist()


def _write_passages(path: Path, articles: Iterable[Any], params: SplitParams, max_articles: int | None,
                    stats: ReadStats) -> None:
    """Split ``articles`` into passages and stream them into the Arrow file ``path``, counting into
    ``stats``."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        cols: dict[str, list[Any]] = {"text": [], "title": [], "article": []}

        def flush() -> None:
            if cols["text"]:
                writer.write_batch(
                    pa.record_batch([cols["text"], cols["title"], cols["article"]], schema=_SCHEMA)
                )
                for v in cols.values():
                    v.clear()

        for art in progress(articles, desc="reading corpus", unit="article"):
            if max_articles is not None and stats.articles >= max_articles:
                break
            passages = split_passages(art.text, params)
            if not passages:
                stats.skipped["article_shorter_than_min_chars"] += 1
                continue
            for p in passages:
                cols["text"].append(p)
                cols["title"].append(art.title)
                cols["article"].append(stats.articles)
            stats.articles += 1
            stats.passages += len(passages)
            if len(cols["text"]) >= _BATCH:
                flush()
        flush()


def build_store(
    spec: str,
    directory: Path,
    text_field: str | None = None,
    title_field: str | None = None,
    params: SplitParams = SplitParams(),
    max_articles: int | None = None,
    key: str = "",
) -> Path:
    """Stream the corpus into ``directory`` (atomically): passages.arrow + meta.json with read statistics."""
    stats = ReadStats()
    with atomic_dir(Path(directory)) as tmp:
        _write_passages(tmp / PASSAGES_FILE, iter_articles(spec, text_field, title_field, stats), params,
                        max_articles, stats)
        if stats.passages == 0:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())) or "it has no articles"
            raise UserError(
                f"corpus {spec!r} gave no passages ({detail}); expected articles with text of at "
                f"least {params.min_chars} characters"
            )
        tf, tl = field_defaults(spec, text_field, title_field)
        atomic_write_json(
            tmp / "meta.json",
            {
                "key": key,
                "spec": spec,
                "text_field": tf,
                "title_field": tl,
                "split": asdict(params),
                "max_articles": max_articles,
                **stats.as_dict(),
            },
        )
    logger.info(
        "corpus %s: %d articles -> %d passages (skipped: %s)",
        spec,
        stats.articles,
        stats.passages,
        dict(stats.skipped) or "none",
    )
    return Path(directory)


def open_store(
    spec: str,
    cache_dir: Path,
    text_field: str | None = None,
    title_field: str | None = None,
    params: SplitParams = SplitParams(),
    max_articles: int | None = None,
) -> PassageStore:
    """The passage store of ``spec`` from the cache, built on first use (the cache is keyed by content)."""
    key = store_key(spec, text_field, title_field, params, max_articles)
    directory = Path(cache_dir) / "passages" / key
    if not (directory / "meta.json").is_file():
        build_store(spec, directory, text_field, title_field, params, max_articles, key=key)
    else:
        logger.info("corpus %s: reusing passage store %s", spec, directory)
    return PassageStore(directory)
