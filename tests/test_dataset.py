"""Dataset directories (parquet shards + manifest.json): writing, reading and validation errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memtrain.data.dataset import DatasetError, iter_rows, load_rows, read_manifest, write_dataset

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("extra", pa.int32()),
    ]
)


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "question": f"q{i}?", "answers": [f"a{i}", "alt"], "extra": i} for i in range(n)]


def test_write_and_read_back_in_shards(tmp_path) -> None:
    consumed = []

    def gen():
        for r in _rows(5):
            consumed.append(r["id"])
            yield r

    manifest = write_dataset(
        tmp_path / "ds", gen(), SCHEMA, "toy", info=lambda: {"seen": len(consumed)}, shard_size=2
    )
    assert manifest["num_rows"] == 5 and manifest["seen"] == 5 and manifest["task"] == "toy"
    assert [s["file"] for s in manifest["shards"]] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert [s["num_rows"] for s in manifest["shards"]] == [2, 2, 1]
    assert read_manifest(tmp_path / "ds") == json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert load_rows(tmp_path / "ds") == _rows(5)
    assert list(iter_rows(tmp_path / "ds", columns=["extra"])) == [
        {"id": f"r{i}", "extra": i} for i in range(5)
    ]
    with pytest.raises(DatasetError, match="no column\\(s\\) nope"):
        list(iter_rows(tmp_path / "ds", columns=["nope"]))


def test_writer_is_all_or_nothing(tmp_path) -> None:
    def broken():
        yield from _rows(3)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_dataset(tmp_path / "ds", broken(), SCHEMA, "toy", shard_size=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no rows to write"):
        write_dataset(tmp_path / "ds", iter([]), SCHEMA, "toy")
    with pytest.raises(ValueError, match="lacks the required column\\(s\\) answers"):
        write_dataset(
            tmp_path / "ds", _rows(1), pa.schema([("id", pa.string()), ("question", pa.string())]), "t"
        )
    assert list(tmp_path.iterdir()) == []


def test_reading_errors_name_the_file_and_what_was_expected(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset directory .* not found"):
        load_rows(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"is not a memtrain dataset: no manifest\.json"):
        load_rows(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"manifest\.json: not valid JSON"):
        load_rows(tmp_path / "empty")

    write_dataset(tmp_path / "ds", _rows(3), SCHEMA, "toy")
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"].append({"file": "shard-00009.parquet", "num_rows": 1})
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"shard shard-00009\.parquet is listed but missing"):
        load_rows(tmp_path / "ds")
    manifest["shards"] = manifest["shards"][:1]
    manifest["shards"][0]["num_rows"] = 4
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DatasetError, match="3 rows, but the manifest says 4"):
        load_rows(tmp_path / "ds")


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pa.table({"id": ["a"], "question": ["q"]}), "required column 'answers' is missing"),
        (
            pa.table({"id": ["a"], "question": ["q"], "answers": ["x"]}),
            "column 'answers' has type string, expected list of strings",
        ),
        (
            pa.table({"id": ["a"], "question": ["q"], "answers": [[]]}, schema=SCHEMA.remove(3)),
            "row 0 \\(id 'a'\\) has no answers",
        ),
        (
            pa.table({"id": ["a", "a"], "question": ["q", "q"], "answers": [["x"], ["y"]]}),
            "duplicate row id 'a'",
        ),
    ],
)
def test_bad_shards_are_reported(tmp_path, table, match) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(table, d / "shard-00000.parquet")
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "format": "memtrain-dataset",
                "task": "x",
                "shards": [{"file": "shard-00000.parquet", "num_rows": table.num_rows}],
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(DatasetError, match=match):
        load_rows(d)
