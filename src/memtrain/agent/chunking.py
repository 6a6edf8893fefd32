"""Cutting a document into the agent's fixed-size token chunks (docs/method.md section 1).

The document is tokenized once with the policy's tokenizer; chunks are slices of ``chunk_tokens`` tokens
and their text is the decoded slice, so a chunk costs (almost exactly) its budget when it is re-tokenized
inside the prompt. A cut never falls inside a character (byte-level BPE can split one UTF-8 character
over several tokens; such a cut moves back to the character's first token), so a chunk can be a few
tokens shorter than the budget, never longer.

``max_chunks=None`` reads every chunk (evaluation, MemAgent's protocol). Documents that need more than
``max_chunks`` chunks are handled by ``truncation``:

* ``centre`` (default, as the reference scripts): keep the first ``ceil(max_chunks / 2)`` chunks and the
  last ``floor(max_chunks / 2)`` chunks (cut from the end of the document); the middle is dropped. The gap
  lies on a chunk boundary, so no chunk straddles it and every chunk is a contiguous piece of the document.
* ``head``: keep the first ``max_chunks`` chunks.
* ``error``: raise, naming the document and its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from memtrain.errors import UserError

Truncation = Literal["centre", "head", "error"]


@dataclass
class ChunkedDocument:
    chunks: list[str]                       # decoded chunk texts, in reading order
    char_spans: list[tuple[int, int]]       # each chunk's [start, end) in the original context string
    token_spans: list[tuple[int, int]]      # each chunk's [start, end) in the document's token ids
    num_tokens: int                         # tokens of the whole document before truncation
    truncated: bool


def _safe(offsets: list[tuple[int, int]], cut: int) -> bool:
    """Whether a cut between tokens ``cut - 1`` and ``cut`` keeps every character whole.

    Tokens holding bytes of the same character share that character's offsets, so a cut is safe when the
    left token ends at or before the right one starts.
    """
    return cut <= 0 or cut >= len(offsets) or offsets[cut - 1][1] <= offsets[cut][0]


def _forward_slices(offsets: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Token ranges of at most ``size`` from the start of the document; a cut moves back to a safe place."""
    out = []
    a = 0
    while a < len(offsets):
        b = min(a + size, len(offsets))
        while b > a + 1 and not _safe(offsets, b):
            b -= 1
        out.append((a, b))
        a = b
    return out


def _backward_slices(offsets: list[tuple[int, int]], size: int, count: int,
                     floor: int) -> list[tuple[int, int]]:
    """The last ``count`` ranges of at most ``size`` tokens, none starting before ``floor``; a cut moves
    forward to a safe place (so a range only ever gets shorter)."""
    out: list[tuple[int, int]] = []
    b = len(offsets)
    for _ in range(count):
        if b <= floor:
            break
        a = max(b - size, floor)
        while a < b - 1 and not _safe(offsets, a):
            a += 1
        out.append((a, b))
        b = a
    return out[::-1]


def chunk_document(context: str, tokenizer: Any, chunk_tokens: int, max_chunks: int | None,
                   truncation: Truncation = "centre", doc_id: str = "") -> ChunkedDocument:
    """Tokenize ``context`` once and cut it into at most ``max_chunks`` chunks (None: no limit) of
    ``chunk_tokens`` tokens."""
    if chunk_tokens < 1 or (max_chunks is not None and max_chunks < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens}, max_chunks={max_chunks}: both must be >= 1")
    if truncation not in ("centre", "head", "error"):
        raise ValueError(f"agent.truncation {truncation!r}: expected 'centre', 'head' or 'error'")
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [(int(o[0]), int(o[1])) for o in enc["offset_mapping"]]
    n = len(ids)
    where = f"document {doc_id!r}" if doc_id else "document"
    if n == 0:
        raise UserError(f"{where}: the context is empty; the agent needs at least one token to read")
    ranges = _forward_slices(offsets, chunk_tokens)
    truncated = max_chunks is not None and len(ranges) > max_chunks
    if truncated and truncation == "error":
        raise UserError(f"{where}: {n} tokens need {len(ranges)} chunks of {chunk_tokens} tokens, more than "
                        f"agent.max_chunks={max_chunks}; raise it or choose agent.truncation=centre|head")
    if truncated and max_chunks is not None:
        if truncation == "head":
            ranges = ranges[:max_chunks]
        else:
            head = ranges[: -(-max_chunks // 2)]
            ranges = head + _backward_slices(offsets, chunk_tokens, max_chunks // 2, floor=head[-1][1])
    chunks = [tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
              for a, b in ranges]
    char_spans = [(0 if a == 0 else offsets[a][0], len(context) if b == n else offsets[b][0])
                  for a, b in ranges]
    return ChunkedDocument(chunks=chunks, char_spans=char_spans, token_spans=ranges, num_tokens=n,
                           truncated=truncated)
