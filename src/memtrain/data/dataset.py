"""Built datasets on disk, for every task: parquet shards + ``manifest.json``, written atomically.

Layout of a dataset directory::

    manifest.json          {"format": "memtrain-dataset", "task": ..., "num_rows": ..., "columns": {...},
                            "shards": [{"file", "num_rows", "sha256"}], ...task-specific build info}
    shard-00000.parquet    rows; every task has at least id (string, unique), question (string) and
    shard-00001.parquet    answers (list of strings, non-empty)

``write_dataset`` is what builders call (``memtrain data proxy`` and the other ``data`` commands);
``load_rows``/``iter_rows`` are what training and evaluation call, validating as they read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memtrain import __version__
from memtrain.io import atomic_dir, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "memtrain-dataset"
FORMAT_VERSION = 1


class DatasetError(ValueError):
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace anything that is not a memtrain dataset, and a dataset unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file; expected a directory for the dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).is_file():
            raise ValueError(
                f"output directory {out_dir} is not empty and holds no {MANIFEST}; refusing to "
                "replace it (choose a new or empty directory)"
            )
        if not overwrite:
            raise ValueError(
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
    with atomic_dir(out) as tmp:
        shards: list[dict[str, Any]] = []
        buf: list[Mapping[str, Any]] = []

        def flush() -> None:
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(list(buf), schema=schema), tmp / name, compression="zstd")
            shards.append({"file": name, "num_rows": len(buf), "sha256": _sha256(tmp / name)})
            buf.clear()

        for row in rows:
            buf.append(row)
            if len(buf) >= shard_size:
                flush()
        if buf:
            flush()
        if not shards:
            raise ValueError(f"no rows to write to {out}")
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
        raise ValueError(f"--out {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / index_file).is_file():
            raise ValueError(f"--out {out}: directory is not empty and holds no {index_file}; refusing to "
                             "replace it (choose a new or empty directory)")
        if not overwrite:
            raise ValueError(f"--out {out} already holds a built set; pass --overwrite to replace it")


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


def iter_rows(
    data_dir: str | Path, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[dict[str, Any]]:
    """Rows of a dataset directory, shard by shard, validating schema, row counts and answers as it goes.

    ``columns`` limits what is read (``id`` is always included, to name rows in errors).
    """
    d = Path(data_dir)
    manifest = read_manifest(d)
    if columns is not None:
        columns = list(dict.fromkeys(["id", *columns]))
    for shard in manifest["shards"]:
        path = d / shard["file"]
        try:
            pf = pq.ParquetFile(path)
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
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for row in batch.to_pylist():
                if "answers" in row and not row["answers"]:
                    raise DatasetError(
                        f"{path}: row {index} (id {row.get('id')!r}) has no answers; expected a "
                        "non-empty list"
                    )
                index += 1
                yield row


def load_rows(data_dir: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """All rows of a dataset directory as dicts (validated; ids must be unique)."""
    rows = list(iter_rows(data_dir, columns))
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DatasetError(f"{data_dir}: duplicate row id {row['id']!r}")
        seen.add(row["id"])
    return rows
