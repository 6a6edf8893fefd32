"""Built datasets on disk, for every task: parquet shards + ``manifest.json``, written atomically.

Layout of a dataset directory::

    manifest.json          {"format": "memtrain-dataset", "task": ..., "num_rows": ..., "columns": {...},
                            "shards": [{"file", "num_rows", "sha256", "size", "footer_sha256"}],
                            ...task-specific build info}
    shard-00000.parquet    rows; every task has at least id (string, unique), question (string) and
    shard-00001.parquet    answers (list of strings, non-empty)

``write_dataset`` is what builders call (``memtrain data proxy`` and the other ``data`` commands);
``load_rows``/``iter_rows`` are what training and evaluation call, validating as they read.

Integrity: every read checks each shard's size and the sha256 of its parquet footer (the schema, row groups
and statistics: a replaced or truncated shard) against the manifest, and parquet page CRCs (written with the
shards) catch flipped bytes in the data as rows are read; ``verify="full"`` (or ``MEMTRAIN_VERIFY_DATA=full``)
also checks the whole-file sha256. Manifests written before the size/footer fields existed still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from memtrain import __version__
from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "memtrain-dataset"
FORMAT_VERSION = 1
VERIFY_ENV = "MEMTRAIN_VERIFY_DATA"  # "full": also hash every shard completely on load
Verify = Literal["fast", "full", "none"]


class DatasetError(UserError):
    """A dataset directory that is missing, malformed or does not match its manifest."""


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)


REQUIRED_COLUMNS: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "id": ("string", _is_string),
    "question": ("string", _is_string),
    "answers": ("list of strings", _is_string_list),
}


def footer_sha256(path: Path) -> str:
    """sha256 of a parquet file's footer (metadata + length + magic): cheap, and it changes with the schema,
    the row groups, their offsets and statistics, so a replaced or truncated shard is noticed."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size < 12:
            raise DatasetError(f"{path}: {size} bytes, too short to be a parquet file")
        fh.seek(size - 8)
        tail = fh.read(8)
        if tail[4:] != b"PAR1":
            raise DatasetError(f"{path}: no parquet footer (the file is truncated or not parquet)")
        length = int.from_bytes(tail[:4], "little") + 8
        if length > size - 4:
            raise DatasetError(f"{path}: parquet footer length {length} exceeds the file size {size}")
        fh.seek(size - length)
        return hashlib.sha256(fh.read(length)).hexdigest()


def _verify_mode(verify: Verify | None) -> Verify:
    mode = verify or os.environ.get(VERIFY_ENV, "").strip().lower() or "fast"
    if mode not in ("fast", "full", "none"):
        raise UserError(f"{VERIFY_ENV}={mode!r}: expected fast, full or none")
    return mode  # type: ignore[return-value]


def verify_shard(path: Path, shard: Mapping[str, Any], verify: Verify = "fast") -> None:
    """Check one shard against its manifest entry (fields an older manifest lacks are not checked)."""
    if verify == "none":
        return
    rebuild = "; the shard was modified or damaged after the build: rebuild the dataset"
    size = path.stat().st_size
    if "size" in shard and size != shard["size"]:
        raise DatasetError(f"{path}: {size} bytes, but the manifest says {shard['size']}{rebuild}")
    if "footer_sha256" in shard and footer_sha256(path) != shard["footer_sha256"]:
        raise DatasetError(f"{path}: parquet footer does not match the manifest's footer_sha256{rebuild}")
    if verify == "full" and "sha256" in shard and sha256_file(path) != shard["sha256"]:
        raise DatasetError(f"{path}: sha256 does not match the manifest{rebuild}")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace anything that is not a memtrain dataset, and a dataset unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file; expected a directory for the dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).is_file():
            raise UserError(
                f"output directory {out_dir} is not empty and holds no {MANIFEST}; refusing to "
                "replace it (choose a new or empty directory)"
            )
        if not overwrite:
            raise UserError(
                f"output directory {out_dir} already holds a dataset; pass --overwrite to replace it"
            )


def write_dataset(
    out_dir: str | Path,
    rows: Iterable[Mapping[str, Any]],
    schema: pa.Schema,
    task: str,
    info: Callable[[], Mapping[str, Any]] | Mapping[str, Any] | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``rows`` as parquet shards of ``shard_size`` rows + manifest, all or nothing (temp dir + rename).

    ``info`` (or a callable returning it, evaluated after all rows were consumed, so builders can report
    counts gathered while generating) is merged into the manifest. Returns the manifest.
    """
    out = Path(out_dir)
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"dataset schema lacks the required column(s) {', '.join(missing)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: expected a positive number of rows per shard")
    check_output_dir(out, overwrite)
    with atomic_dir(out, durable=True) as tmp:
        shards: list[dict[str, Any]] = []
        buf: list[Mapping[str, Any]] = []

        def flush() -> None:
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(list(buf), schema=schema), tmp / name, compression="zstd",
                           write_page_checksum=True)
            shards.append({"file": name, "num_rows": len(buf), "sha256": sha256_file(tmp / name),
                           "size": (tmp / name).stat().st_size, "footer_sha256": footer_sha256(tmp / name)})
            buf.clear()

        for row in rows:
            buf.append(row)
            if len(buf) >= shard_size:
                flush()
        if buf:
            flush()
        if not shards:
            raise UserError(f"no rows to write to {out}")
        extra = dict(info() if callable(info) else (info or {}))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": task,
            "num_rows": sum(s["num_rows"] for s in shards),
            "columns": {f.name: str(f.type) for f in schema},
            "shards": shards,
            "memtrain_version": __version__,
            **extra,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def check_eval_out(out: Path, index_file: str, overwrite: bool) -> None:
    """An eval set directory may replace only an eval set of the same kind, and only with ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / index_file).is_file():
            raise UserError(f"--out {out}: directory is not empty and holds no {index_file}; refusing to "
                            "replace it (choose a new or empty directory)")
        if not overwrite:
            raise UserError(f"--out {out} already holds a built set; pass --overwrite to replace it")


# one dataset of an eval set: its rows and its manifest info
EvalPart = tuple[Iterable[Mapping[str, Any]], Mapping[str, Any]]


def write_eval_set(out: Path, index_file: str, parts: Mapping[str, EvalPart], schema: pa.Schema, task: str,
                   index: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """An eval set: one dataset per part (``out/NAME`` from its rows and manifest info) plus ``index_file``,
    all or nothing; it replaces only an eval set of the same kind, and only with ``overwrite``."""
    check_eval_out(out, index_file, overwrite)
    with atomic_dir(out) as tmp:
        for name, (rows, info) in parts.items():
            write_dataset(tmp / name, rows, schema, task, info=info)
        atomic_write_json(tmp / index_file, index)
    return index


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a dataset directory, with its shard list checked against the files present."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"dataset directory {d} not found")
    path = d / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{d} is not a memtrain dataset: no {MANIFEST} (build one with `memtrain data ...`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f'{path}: expected "format": "{FORMAT}"')
    shards = manifest.get("shards")
    if (
        not isinstance(shards, list)
        or not shards
        or not all(isinstance(s, dict) and "file" in s for s in shards)
    ):
        raise DatasetError(f"{path}: field 'shards' must be a non-empty list of {{file, num_rows}} objects")
    for s in shards:
        if not (d / s["file"]).is_file():
            raise DatasetError(f"{path}: shard {s['file']} is listed but missing from {d}")
    return manifest


def dataset_fingerprint(data_dir: str | Path) -> str:
    """A short hash of a dataset's content, from its manifest's shard hashes (size and footer for shards
    whose manifest lacks them): a run records it, and a resume on a rebuilt or replaced set is refused."""
    shards = read_manifest(data_dir)["shards"]
    keys = [[s["file"], s.get("num_rows"), s.get("sha256") or s.get("footer_sha256") or s.get("size")]
            for s in shards]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def overlap_reason(train_rows: Iterable[Mapping[str, Any]],
                   eval_rows: Iterable[Mapping[str, Any]]) -> str | None:
    """Why an evaluation set is not held out from a training set (None when it is): rows with the same id,
    the same text (context and question), or source passages in common (proxy rows' ``passage_ids``)."""
    def text(r: Mapping[str, Any]) -> str:
        return hashlib.sha256(f"{r.get('context', '')}\x00{r.get('question', '')}".encode()).hexdigest()

    train = list(train_rows)
    ids = {r["id"] for r in train}
    texts = {text(r) for r in train}
    passages = {p for r in train for p in (r.get("passage_ids") or ())}
    same_id = same_text = shared = 0
    for r in eval_rows:
        same_id += r["id"] in ids
        same_text += text(r) in texts
        shared += bool(passages.intersection(r.get("passage_ids") or ()))
    found = [f"{n} {what}" for n, what in ((same_id, "row id(s)"), (same_text, "row text(s)"),
                                           (shared, "row(s) with source passages")) if n]
    return " and ".join(found) + " in common" if found else None


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for name, (expected, ok) in REQUIRED_COLUMNS.items():
        if name not in schema.names:
            raise DatasetError(
                f"{path}: required column {name!r} is missing (columns: {', '.join(schema.names)})"
            )
        if not ok(schema.field(name).type):
            raise DatasetError(
                f"{path}: column {name!r} has type {schema.field(name).type}, expected {expected}"
            )


def require_columns(data_dir: str | Path, columns: Iterable[str], task: str) -> None:
    """Check, from the manifest (or a shard's footer) and without reading rows, that the dataset has every
    column ``task`` needs, so a wrong ``data.path`` fails before any model is loaded."""
    d = Path(data_dir)
    manifest = read_manifest(d)
    have = manifest.get("columns")
    if isinstance(have, dict) and have:
        names = list(have)
    else:  # a manifest without its column list: the first shard's schema (footer only)
        path = d / manifest["shards"][0]["file"]
        try:
            names = list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        built = manifest.get("task", "?")
        also = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise DatasetError(
            f"dataset {d} (built for task {built!r}) has no column {missing[0]!r}, which task {task!r} needs"
            f"{also}; columns: {', '.join(names)}"
        )


def iter_rows(
    data_dir: str | Path,
    columns: list[str] | None = None,
    batch_size: int = 256,
    verify: Verify | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of a dataset directory, shard by shard, validating integrity (:func:`verify_shard`), schema, row
    counts and answers as it goes.

    ``columns`` limits what is read (``id`` is always included, to name rows in errors). ``verify``: "fast"
    (default: size + footer hash + page CRCs), "full" (also the whole-file sha256; default from
    ``MEMTRAIN_VERIFY_DATA``) or "none".
    """
    d = Path(data_dir)
    manifest = read_manifest(d)
    mode = _verify_mode(verify)
    if columns is not None:
        columns = list(dict.fromkeys(["id", *columns]))
    for shard in manifest["shards"]:
        path = d / shard["file"]
        verify_shard(path, shard, mode)
        try:
            pf = pq.ParquetFile(path, page_checksum_verification=mode != "none")
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
        _check_schema(path, pf.schema_arrow)
        if columns is not None:
            absent = [c for c in columns if c not in pf.schema_arrow.names]
            if absent:
                raise DatasetError(
                    f"{path}: no column(s) {', '.join(absent)} (columns: {', '.join(pf.schema_arrow.names)})"
                )
        if "num_rows" in shard and pf.metadata.num_rows != shard["num_rows"]:
            raise DatasetError(
                f"{path}: {pf.metadata.num_rows} rows, but the manifest says {shard['num_rows']}"
            )
        index = 0
        batches = pf.iter_batches(batch_size=batch_size, columns=columns)
        while True:
            try:
                batch = next(batches, None)
                rows = batch.to_pylist() if batch is not None else []
            except (pa.ArrowException, OSError) as exc:  # damaged pages: ZSTD/CRC/decoding errors
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                raise DatasetError(
                    f"{path}: cannot read rows after row {index} ({first}); the shard is damaged: rebuild "
                    "the dataset"
                ) from exc
            if batch is None:
                break
            for row in rows:
                if "answers" in row and not row["answers"]:
                    raise DatasetError(
                        f"{path}: row {index} (id {row.get('id')!r}) has no answers; expected a "
                        "non-empty list"
                    )
                index += 1
                yield row


def load_rows(
    data_dir: str | Path, columns: list[str] | None = None, verify: Verify | None = None
) -> list[dict[str, Any]]:
    """All rows of a dataset directory as dicts (validated; ids must be unique; ``verify``: see iter_rows)."""
    rows = list(iter_rows(data_dir, columns, verify=verify))
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DatasetError(f"{data_dir}: duplicate row id {row['id']!r}")
        seen.add(row["id"])
    return rows
