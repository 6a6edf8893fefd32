"""Corpus readers, passage splitting and the cached passage store."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_helpers import make_articles, write_jsonl
from memtrain.data.corpus import SplitParams, build_store, iter_articles, open_store, split_passages


def test_split_merges_short_lines_and_splits_long_paragraphs() -> None:
    params = SplitParams(max_chars=120, min_chars=30)
    text = (
        "History\n"
        "The first paragraph is long enough to stand on its own as a passage.\n\n"
        "   Second   paragraph\twith  odd   spacing, also long enough.\n"
        + " ".join(f"Sentence number {i} ends here." for i in range(12))
        + "\nTail."
    )
    out = split_passages(text, params)
    assert out[0] == "History\nThe first paragraph is long enough to stand on its own as a passage."
    assert out[1] == "Second paragraph with odd spacing, also long enough."
    long_pieces = out[2:]
    assert len(long_pieces) > 1 and all(len(p) <= 120 for p in long_pieces[:-1])
    assert len(long_pieces[-1]) <= 120 + 30
    assert all(p.endswith(".") for p in long_pieces)  # cut at sentence ends only
    assert long_pieces[-1].endswith("\nTail.")  # a short last line joins the previous passage
    joined = " ".join(p.replace("\nTail.", "") for p in long_pieces)
    assert joined == " ".join(f"Sentence number {i} ends here." for i in range(12))


def test_split_drops_articles_shorter_than_min_and_cuts_huge_sentences() -> None:
    assert split_passages("Too short.", SplitParams(max_chars=200, min_chars=50)) == []
    word_salad = " ".join(["word"] * 100)  # one 499-char "sentence" without any end mark
    pieces = split_passages(word_salad, SplitParams(max_chars=100, min_chars=10))
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == word_salad


def test_split_params_are_validated() -> None:
    with pytest.raises(ValueError, match="max_chars >= 2"):
        SplitParams(max_chars=50, min_chars=40)


def test_readers_agree_across_formats(tmp_path) -> None:
    arts = make_articles(n_per_topic=2)
    write_jsonl(tmp_path / "a.jsonl", arts)
    (tmp_path / "b.json").write_text(
        json.dumps({a["title"]: {"text": a["text"]} for a in arts}), encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(arts), tmp_path / "c.parquet")
    from_jsonl = [(a.title, a.text) for a in iter_articles(str(tmp_path / "a.jsonl"))]
    from_json = [
        (a.title, a.text) for a in iter_articles(str(tmp_path / "b.json"))
    ]  # dict keys become titles
    from_parquet = [(a.title, a.text) for a in iter_articles(str(tmp_path / "c.parquet"))]
    expected = [(a["title"], a["text"]) for a in arts]
    assert from_jsonl == from_json == from_parquet == expected
    # a directory reads all of its files, in sorted order
    assert len(list(iter_articles(str(tmp_path)))) == 3 * len(arts)


def test_txt_file_is_one_article_named_after_the_file(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text(
        "First paragraph of the notes, long enough.\n\nSecond one, also long enough to count.\n",
        encoding="utf-8",
    )
    arts = list(iter_articles(str(tmp_path / "notes.txt")))
    assert [a.title for a in arts] == ["notes"]
    assert split_passages(arts[0].text, SplitParams(max_chars=200, min_chars=20)) == [
        "First paragraph of the notes, long enough.",
        "Second one, also long enough to count.",
    ]


def test_custom_text_field_and_empty_texts_are_counted(tmp_path) -> None:
    from memtrain.data.corpus import ReadStats

    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"body": "Some body text long enough to be a passage.", "name": "X"}\n{"body": ""}\n'
        '{"body": null}\n',
        encoding="utf-8",
    )
    stats = ReadStats()
    arts = list(iter_articles(str(path), text_field="body", title_field="name", stats=stats))
    assert [(a.title, a.text) for a in arts] == [("X", "Some body text long enough to be a passage.")]
    assert stats.skipped["empty_article"] == 2


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "missing.jsonl",
            '{"title": "A", "body": "x"}\n',
            r"missing\.jsonl:1: no text field 'text' \(fields: title, body\)",
        ),
        ("bad.jsonl", '{"text": "fine"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '["not", "an", "object"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("num.jsonl", '{"text": 5}\n', r"num\.jsonl:1: field 'text' must be a string, got int"),
        ("scalar.json", "3", r"scalar\.json: expected a JSON list of records"),
    ],
)
def test_bad_records_name_the_file_line_and_field(tmp_path, name, content, match) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        list(iter_articles(str(path)))


def test_non_utf8_and_parquet_column_errors(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9 au lait"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1: not valid UTF-8 .*expected UTF-8"):
        list(iter_articles(str(path)))
    pq.write_table(pa.table({"body": ["x"], "title": ["t"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: no text column 'text' \(columns: body, title\)"):
        list(iter_articles(str(tmp_path / "p.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        list(iter_articles(str(tmp_path / "junk.parquet")))


def test_missing_paths_and_empty_directories(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found: expected the embedded name"):
        list(iter_articles(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no \.jsonl/\.json/\.parquet/\.txt files"):
        list(iter_articles(str(tmp_path / "empty")))
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported type '\.csv'"):
        list(iter_articles(str(tmp_path / "x.csv")))


def test_hf_spec_needs_datasets_or_is_validated() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(
            ValueError, match=r"needs the optional `datasets` package: pip install 'memtrain\[hf\]'"
        ):
            list(iter_articles("hf:wikimedia/wikipedia:20231101.en"))
    with pytest.raises(ValueError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
        list(iter_articles("hf:a:b:c:d"))


def test_empty_corpus_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "tiny"}\n', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"gave no passages \(article_shorter_than_min_chars: 1, empty_article: 1\)"
    ):
        build_store(str(path), tmp_path / "store")
    assert not (tmp_path / "store").exists()  # nothing half-written


def test_store_random_access_caching_and_invalidation(tmp_path) -> None:
    arts = make_articles(n_per_topic=3)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", arts)
    store = open_store(str(corpus), tmp_path / "cache")
    assert len(store) == 2 * len(arts) == store.meta["passages"]
    assert store.meta["articles"] == len(arts)
    rows = [5, 0, 5, len(store) - 1]
    expected = [p for a in arts for p in a["text"].split("\n")]
    assert store.texts(rows) == [expected[r] for r in rows]
    assert store.titles([0, 1, 2]) == [arts[0]["title"], arts[0]["title"], arts[1]["title"]]
    marker = (store.directory / "meta.json").stat().st_mtime_ns
    again = open_store(str(corpus), tmp_path / "cache")  # reused, not rebuilt
    assert again.directory == store.directory and (again.directory / "meta.json").stat().st_mtime_ns == marker
    write_jsonl(corpus, arts[:4])
    os.utime(corpus, ns=(marker + 10**9, marker + 10**9))
    changed = open_store(str(corpus), tmp_path / "cache")  # a changed file gets its own store
    assert changed.directory != store.directory and len(changed) == 8
    limited = open_store(str(corpus), tmp_path / "cache", max_articles=2)
    assert limited.meta["articles"] == 2 and len(limited) == 4


@pytest.mark.slow
def test_embedded_wikipedia_corpus(wiki_corpus_path, tmp_path) -> None:
    store = open_store("wikipedia-vital", tmp_path / "cache")
    assert store.meta["text_field"] == "extract"
    assert store.meta["articles"] > 10_000 and len(store) >= store.meta["articles"]
    titles = set(store.titles(list(range(0, len(store), 97))))
    assert "2001: A Space Odyssey" in set(store.titles(list(range(len(store))))) and len(titles) > 50
