"""A memtrain dataset as the parquet file verl's ``RLHFDataset`` reads.

verl needs a chat ``prompt`` column (it only filters and logs it here: the agent loop renders every real
prompt with ``memtrain.prompts``), ``data_source``, ``agent_name`` (which agent loop runs the row) and
``extra_info.index``. The memtrain row itself travels as JSON in the ``memtrain_row`` column, so any task's
fields (``context``, ``entity_spans``, ...) reach the agent loop unchanged, whatever their types.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memtrain.backends.verl import AGENT_NAME, ROW_COLUMN
from memtrain.errors import UserError

SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("agent_name", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.string()))])),
    ("extra_info", pa.struct([("index", pa.int64()), ("id", pa.string())])),
    (ROW_COLUMN, pa.string()),
])


def verl_rows(rows: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """verl dataset rows for memtrain ``rows`` of ``task`` (checked by
    ``memtrain.rl.tasks.registry.check_rows``)."""
    out = []
    for i, row in enumerate(rows):
        try:
            payload = json.dumps(row, ensure_ascii=False)
        except TypeError as exc:
            raise UserError(f"row {i} (id {row.get('id')!r}) is not JSON-serialisable: {exc}") from None
        out.append({
            "data_source": f"memtrain/{task}",
            "prompt": [{"role": "user", "content": str(row["question"])}],
            "agent_name": AGENT_NAME,
            "reward_model": {"style": "rule", "ground_truth": [str(a) for a in row.get("answers") or []]},
            "extra_info": {"index": i, "id": str(row["id"])},
            ROW_COLUMN: payload,
        })
    return out


def write_verl_dataset(rows: Sequence[dict[str, Any]], task: str, path: Path) -> Path:
    """Write ``rows`` as one verl parquet file at ``path`` (atomically: temp file + rename)."""
    table = pa.Table.from_pylist(verl_rows(rows, task), schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
