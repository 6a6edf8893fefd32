"""HotpotQA readers, the long-document builder, the closed-book filter and `memtrain data longqa`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memtrain.cli.main import main
from memtrain.data.dataset import load_rows
from memtrain.data.longqa import (
    DistractorPool,
    build_example,
    build_longqa,
    closed_book_filter,
    eval_sets,
    paragraph_pool,
    parse_sizes,
    read_hotpotqa,
    render_document,
    select_questions,
    write_longqa,
)


def _hf_record(i: int) -> dict:
    titles = [f"Gold A{i}", f"Gold B{i}", *[f"Own D{i}-{j}" for j in range(3)]]
    return {
        "id": f"q{i}", "question": f"Question number {i}?", "answer": f"answer {i}", "type": "bridge",
        "level": "hard",
        "supporting_facts": {"title": [f"Gold A{i}", f"Gold B{i}", f"Gold A{i}"], "sent_id": [0, 0, 1]},
        "context": {"title": titles, "sentences": [[f"{t} first sentence.", " Second one."] for t in titles]},
    }


def _official(record: dict) -> dict:
    ctx = record["context"]
    return {"_id": record["id"], "question": record["question"], "answer": record["answer"],
            "type": record["type"], "level": record["level"],
            "supporting_facts": [[t, s] for t, s in zip(record["supporting_facts"]["title"],
                                                        record["supporting_facts"]["sent_id"], strict=True)],
            "context": [[t, s] for t, s in zip(ctx["title"], ctx["sentences"], strict=True)]}


@pytest.fixture()
def hf_file(tmp_path: Path) -> Path:
    path = tmp_path / "hotpot.jsonl"
    path.write_text("\n".join(json.dumps(_hf_record(i)) for i in range(30)) + "\n", encoding="utf-8")
    return path


def test_both_layouts_read_identically(tmp_path: Path, hf_file: Path) -> None:
    official = tmp_path / "hotpot_dev_distractor_v1.json"
    official.write_text(json.dumps([_official(_hf_record(i)) for i in range(30)]), encoding="utf-8")
    parquet = tmp_path / "hotpot.parquet"
    pq.write_table(pa.Table.from_pylist([_hf_record(i) for i in range(30)]), parquet)
    a, b, c = read_hotpotqa(hf_file), read_hotpotqa(official), read_hotpotqa(parquet)
    assert a == b == c
    ex = a[3]
    assert ex.id == "q3" and ex.answer == "answer 3" and ex.gold_titles == ("Gold A3", "Gold B3")
    assert ex.paragraphs[0] == ("Gold A3", "Gold A3 first sentence. Second one.")
    assert [t for t, _ in ex.gold_paragraphs()] == ["Gold A3", "Gold B3"]


def test_reader_errors_name_file_record_and_field(tmp_path: Path) -> None:
    bad = _hf_record(0)
    bad["context"] = {"title": ["x"], "sentences": "oops"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_hf_record(1)) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 2: field 'context'"):
        read_hotpotqa(path)
    noanswer = {**_hf_record(0), "answer": ""}
    path.write_text(json.dumps(noanswer) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="field 'answer'"):
        read_hotpotqa(path)
    assert read_hotpotqa(path, require_answer=False)[0].answer == ""
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(_hf_record(0)) + "\n" + json.dumps(_hf_record(0)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="already read"):
        read_hotpotqa(dup)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_hotpotqa(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"garbage.jsonl:1: not valid JSON"):
        read_hotpotqa(garbage)


def test_documents_hold_gold_and_pool_distractors_only(hf_file: Path) -> None:
    examples = read_hotpotqa(hf_file)
    rows = build_longqa(examples, [10, 20], num_questions=5, seed=1)
    pool_titles = {t for ex in examples for t, _ in ex.paragraphs}
    for size, size_rows in rows.items():
        assert len(size_rows) == 5
        for row in size_rows:
            ex = next(e for e in examples if e.id == row["id"])
            titles = re.findall(r"Document \d+:\n(.*)\n", row["context"] + "\n")
            assert len(titles) == size == row["num_docs"]
            assert len(set(titles)) == size  # no paragraph twice
            assert set(ex.gold_titles) <= set(titles)
            own_distractors = {t for t, _ in ex.paragraphs} - set(ex.gold_titles)
            assert not own_distractors & set(titles)  # the question's own paragraphs come only as gold
            assert set(titles) <= pool_titles
            gold_in_order = [t for t in titles if t in ex.gold_titles]
            assert [titles[p - 1] for p in row["gold_positions"]] == gold_in_order
            assert row["answers"] == [ex.answer]
    # the same questions at every size, in the same order
    assert [r["id"] for r in rows[10]] == [r["id"] for r in rows[20]]


def test_build_is_deterministic_and_sizes_are_nested(hf_file: Path) -> None:
    examples = read_hotpotqa(hf_file)
    one = build_longqa(examples, [8, 16], 4, seed=7)
    assert one == build_longqa(examples, [16, 8], 4, seed=7)  # order of sizes does not matter
    assert one[8] == build_longqa(examples, [8], 4, seed=7)[8]  # adding a size changes no other size
    other = build_longqa(examples, [8], 4, seed=8)
    assert [r["context"] for r in other[8]] != [r["context"] for r in one[8]]
    pool = DistractorPool(paragraph_pool(examples))
    small = pool.draw(examples[0], 5, seed=3)
    assert pool.draw(examples[0], 40, seed=3)[:5] == small


def test_own_distractors_and_limits(hf_file: Path) -> None:
    examples = read_hotpotqa(hf_file)
    pool = DistractorPool(paragraph_pool(examples))
    row = build_example(examples[0], pool, 8, seed=0, own_distractors=True)
    titles = re.findall(r"Document \d+:\n(.*)\n", row["context"] + "\n")
    assert {t for t, _ in examples[0].paragraphs} <= set(titles)
    with pytest.raises(ValueError, match="already has 5 gold and own paragraphs"):
        build_example(examples[0], pool, 4, seed=0, own_distractors=True)
    with pytest.raises(ValueError, match=r"needs 1000 distractor paragraphs but the pool has only 145"):
        pool.draw(examples[0], 1000, seed=0)
    with pytest.raises(ValueError, match="only 30 questions"):
        select_questions(examples, 31, seed=0)
    assert parse_sizes("200, 50,100,50") == (50, 100, 200)
    with pytest.raises(ValueError, match="--num-docs"):
        parse_sizes("50,abc")
    assert render_document([("T", "x"), ("U", "y")]) == "Document 1:\nT\nx\n\nDocument 2:\nU\ny"


def test_closed_book_filter_drops_known_answers_and_caches(hf_file: Path, tmp_path: Path,
                                                           tiny_model_dir: Path) -> None:
    from memtrain.engines.scripted import ScriptedEngine
    from memtrain.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    examples = read_hotpotqa(hf_file)

    def respond(prompt: str, sample: int) -> str:  # "knows" the even questions
        n = int(re.search(r"Question number (\d+)\?", prompt).group(1))
        return f"\\boxed{{answer {n}}}" if n % 2 == 0 else "\\boxed{no idea}"

    engine = ScriptedEngine(respond, tok)
    cache = tmp_path / "cache.jsonl"
    drop = closed_book_filter(engine, tok, "tiny", cache)
    chosen = select_questions(examples, 6, seed=0, drop=drop)
    assert len(chosen) == 6 and all(int(ex.id[1:]) % 2 == 1 for ex in chosen)
    asked = sum(len(call) for call in engine.calls)
    assert asked == len({r["id"] for r in map(json.loads, cache.read_text().splitlines())})
    # a second filter over the same cache asks the engine nothing new
    engine2 = ScriptedEngine(respond, tok)
    again = select_questions(examples, 6, seed=0, drop=closed_book_filter(engine2, tok, "tiny", cache))
    assert [e.id for e in again] == [e.id for e in chosen] and engine2.calls == []


def test_write_eval_and_train_sets(hf_file: Path, tmp_path: Path) -> None:
    examples = read_hotpotqa(hf_file)
    rows = build_longqa(examples, [6, 12], 3, seed=0)
    out = tmp_path / "eval"
    index = write_longqa(out, rows, {"params": {"seed": 0}})
    assert index["sizes"] == [6, 12]
    sets = eval_sets(out)
    assert [n for n, _ in sets] == [6, 12]
    assert load_rows(sets[1][1]) == rows[12]
    with pytest.raises(ValueError, match="--overwrite"):
        write_longqa(out, rows, {})
    write_longqa(out, {6: rows[6]}, {}, overwrite=True)
    assert [n for n, _ in eval_sets(out)] == [6]
    train = tmp_path / "train"
    manifest = write_longqa(train, {12: rows[12]}, {}, train=True)
    assert manifest["task"] == "longqa" and manifest["num_docs"] == 12
    assert eval_sets(train) == [(12, train)]
    with pytest.raises(ValueError, match="one document size"):
        write_longqa(tmp_path / "t2", rows, {}, train=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_longqa(tmp_path / "other", rows, {})


def test_cli_builds_sets_and_reports_errors(hf_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lq"
    assert main(["data", "longqa", "--hotpotqa", str(hf_file), "--out", str(out), "--num-docs", "6,9",
                 "--num-questions", "4", "--seed", "3"]) == 0
    assert "wrote 4 questions x 2 size(s)" in capsys.readouterr().out
    assert [len(load_rows(d)) for _, d in eval_sets(out)] == [4, 4]
    assert main(["data", "longqa", "--hotpotqa", str(hf_file), "--out", str(tmp_path / "t"), "--num-docs",
                 "6,9", "--train"]) == 1
    assert "--train builds one document size" in capsys.readouterr().err
    assert main(["data", "longqa", "--hotpotqa", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "nope.json does not exist" in capsys.readouterr().err


def test_shared_hotpotqa_builds_at_paper_sizes(shared_data: Path) -> None:
    files = [shared_data / "hotpotqa" / f"{s}.jsonl" for s in ("dev", "train", "test")]
    examples = read_hotpotqa(files)
    assert len(examples) == 1100
    rows = build_longqa(examples, [50, 6400], 3, seed=42)
    for small, big in zip(rows[50], rows[6400], strict=True):
        assert small["id"] == big["id"] and big["context"].count("Document ") >= 6400
        assert all(f"\n{t}\n" in big["context"] for t in big["gold_titles"])
