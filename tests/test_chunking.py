"""Chunking: exact token budgets, char spans mapping back to the context, whole characters, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.agent.chunking import chunk_document
from memtrain.models import load_tokenizer

TEXT = " ".join(f"Sentence {i} says that item {i} costs {i * 3} euros." for i in range(60))


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _ntok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_untruncated_chunks_partition_the_document(tok) -> None:
    doc = chunk_document(TEXT, tok, chunk_tokens=50, max_chunks=100)
    assert not doc.truncated
    assert "".join(doc.chunks) == TEXT
    assert doc.num_tokens == _ntok(tok, TEXT)
    assert len(doc.chunks) == -(-doc.num_tokens // 50)
    assert [b - a for a, b in doc.token_spans[:-1]] == [50] * (len(doc.chunks) - 1)
    assert doc.char_spans[0][0] == 0 and doc.char_spans[-1][1] == len(TEXT)
    for (a, b), (c, _), chunk in zip(doc.char_spans, [*doc.char_spans[1:], (len(TEXT), 0)], doc.chunks,
                                     strict=True):
        assert TEXT[a:b] == chunk and b == c


def test_cuts_never_split_a_character(tok) -> None:
    """The tiny byte-level tokenizer spells é and emoji with several tokens; no chunk may hold half of one."""
    text = "Crème brûlée 😀 est délicieuse. " * 30
    doc = chunk_document(text, tok, chunk_tokens=7, max_chunks=1000)
    assert "".join(doc.chunks) == text
    assert all("\ufffd" not in c for c in doc.chunks)
    assert all(0 < b - a <= 7 for a, b in doc.token_spans)
    assert any(b - a < 7 for a, b in doc.token_spans[:-1])  # some cut really had to move back


def test_exact_budget_is_not_truncated(tok) -> None:
    n = _ntok(tok, TEXT)
    doc = chunk_document(TEXT, tok, chunk_tokens=n // 4 + (n % 4 > 0), max_chunks=4)
    assert not doc.truncated and len(doc.chunks) == 4 and "".join(doc.chunks) == TEXT


def test_centre_truncation_keeps_head_and_tail_chunks(tok) -> None:
    doc = chunk_document(TEXT, tok, chunk_tokens=40, max_chunks=3, truncation="centre")
    assert doc.truncated and len(doc.chunks) == 3
    assert doc.char_spans[0][0] == 0 and doc.char_spans[-1][1] == len(TEXT)
    assert doc.char_spans[0][1] == doc.char_spans[1][0]  # two head chunks are contiguous
    assert doc.char_spans[1][1] < doc.char_spans[2][0]   # the middle is dropped
    assert TEXT.startswith(doc.chunks[0] + doc.chunks[1]) and TEXT.endswith(doc.chunks[2])
    assert [b - a for a, b in doc.token_spans] == [40, 40, 40]
    assert doc.token_spans[2][1] == doc.num_tokens


def test_head_truncation_keeps_the_first_chunks(tok) -> None:
    doc = chunk_document(TEXT, tok, chunk_tokens=40, max_chunks=3, truncation="head")
    assert doc.truncated and len(doc.chunks) == 3
    assert TEXT.startswith("".join(doc.chunks)) and doc.token_spans[-1][1] == 120


def test_error_truncation_names_the_document(tok) -> None:
    with pytest.raises(ValueError, match=r"'doc-7': \d+ tokens need \d+ chunks .* agent.max_chunks=3"):
        chunk_document(TEXT, tok, chunk_tokens=40, max_chunks=3, truncation="error", doc_id="doc-7")
    short = chunk_document("short text", tok, chunk_tokens=40, max_chunks=3, truncation="error")
    assert short.chunks == ["short text"] and not short.truncated


def test_bad_input_is_rejected(tok) -> None:
    with pytest.raises(ValueError, match="empty"):
        chunk_document("", tok, chunk_tokens=10, max_chunks=2, doc_id="x")
    with pytest.raises(ValueError, match="truncation 'middle'"):
        chunk_document("abc", tok, chunk_tokens=10, max_chunks=2, truncation="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunk_document("abc", tok, chunk_tokens=0, max_chunks=2)
