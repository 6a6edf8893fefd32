"""Long-document multi-hop QA ("RULER-HotpotQA", docs/method.md section 5): HotpotQA readers and builder.

Per question the document is its gold (supporting-fact) paragraphs plus distractor paragraphs drawn from the
pool of all other questions' paragraphs, shuffled and written as "Document i:" blocks. The same questions are
used at every size and everything is derived from (seed, question id), so a build is reproducible and adding a
size never changes the documents of the others; the distractors of a smaller size are a prefix of those of a
larger one, so accuracy differences across sizes come from length, not from different distractors.

HotpotQA comes in two layouts, auto-detected per record, that both become the same ``HotpotExample``:

* official (``hotpot_train_v1.1.json``, ``hotpot_dev_distractor_v1.json``): one JSON list of
  ``{_id, question, answer, supporting_facts: [[title, sent_id]], context: [[title, [sentences]]]}``;
* Hugging Face ``hotpot_qa`` (JSONL, JSON list or parquet): ``{id, question, answer, type, level,
  supporting_facts: {title: [], sent_id: []}, context: {title: [], sentences: [[]]}}``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from memtrain.assets import home
from memtrain.data.dataset import read_manifest, write_dataset, write_eval_set
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
from memtrain.errors import UserError
from memtrain.io import append_jsonl, read_jsonl
from memtrain.prompts import render, template
from memtrain.scoring import score


@dataclass(frozen=True)
class HotpotExample:
    """One HotpotQA question, its paragraphs as (title, text) pairs; ``gold_titles`` support the answer."""

    id: str
    question: str
    answer: str
    paragraphs: tuple[tuple[str, str], ...]
    gold_titles: tuple[str, ...]
    type: str = ""
    level: str = ""

    def gold_paragraphs(self) -> list[tuple[str, str]]:
        """The question's own paragraphs whose title is a supporting-fact title (in context order)."""
        gold = set(self.gold_titles)
        return [p for p in self.paragraphs if p[0] in gold]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, raw record) from parquet, a JSON list or JSONL, whichever the file holds."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc}); expected HotpotQA JSON, JSONL or parquet") from exc
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: empty file; expected HotpotQA JSON, JSONL or parquet")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        yield from enumerate(data)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one HotpotQA record per "
                            "line (Hugging Face hotpot_qa layout) or one JSON list (official)") from exc


def _fail(path: Path, where: int, field: str, expected: str, got: Any) -> UserError:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return UserError(f"{path}: record {where}: field {field!r}: expected {expected}, got {shown}")


def _context(path: Path, where: int, raw: Any) -> list[tuple[str, str]]:
    """Paragraphs from either context layout; sentences are joined as released (they carry their spaces)."""
    pairs: list[tuple[Any, Any]]
    if isinstance(raw, dict) and "title" in raw and "sentences" in raw:
        if len(raw["title"]) != len(raw["sentences"]):
            raise _fail(path, where, "context", "as many titles as sentence lists", raw)
        pairs = list(zip(raw["title"], raw["sentences"], strict=True))
    elif isinstance(raw, list) and all(isinstance(p, list | tuple) and len(p) == 2 for p in raw):
        pairs = [(p[0], p[1]) for p in raw]
    else:
        raise _fail(path, where, "context", "[[title, [sentences]]] (official) or "
                    "{title: [], sentences: [[]]} (Hugging Face)", raw)
    out = []
    for title, sentences in pairs:
        if not isinstance(title, str) or not isinstance(sentences, list | tuple) or \
                not all(isinstance(s, str) for s in sentences):
            raise _fail(path, where, "context", "string titles with lists of string sentences",
                        [title, sentences])
        out.append((title, "".join(sentences).strip()))
    return out


def _support_titles(path: Path, where: int, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, dict) and "title" in raw:
        titles = list(raw["title"])
    elif isinstance(raw, list) and all(isinstance(f, list | tuple) and len(f) == 2 for f in raw):
        titles = [f[0] for f in raw]
    else:
        raise _fail(path, where, "supporting_facts", "[[title, sent_id]] or {title: [], sent_id: []}", raw)
    if not all(isinstance(t, str) for t in titles):
        raise _fail(path, where, "supporting_facts", "string titles", titles)
    return tuple(dict.fromkeys(titles))


def parse_record(path: Path, where: int, record: Any, require_answer: bool = True) -> HotpotExample:
    """One record of either layout -> ``HotpotExample``; errors name the file, record and field."""
    if not isinstance(record, dict):
        raise _fail(path, where, "<record>", "a JSON object", record)
    qid = record.get("_id", record.get("id"))
    if not isinstance(qid, str | int) or str(qid) == "":
        raise _fail(path, where, "_id/id", "a non-empty question id", qid)
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _fail(path, where, "question", "a non-empty string", question)
    answer = record.get("answer", "")
    if not isinstance(answer, str) or (require_answer and not answer.strip()):
        raise _fail(path, where, "answer", "a non-empty string (test splits without answers cannot be used "
                    "as questions, only as a distractor pool)", answer)
    if "context" not in record:
        raise _fail(path, where, "context", "the question's paragraphs", None)
    return HotpotExample(
        id=str(qid), question=question.strip(), answer=answer.strip(),
        paragraphs=tuple(_context(path, where, record["context"])),
        gold_titles=_support_titles(path, where, record.get("supporting_facts", [])),
        type=str(record.get("type") or ""), level=str(record.get("level") or ""),
    )


def read_hotpotqa(paths: str | Path | Sequence[str | Path],
                  require_answer: bool = True) -> list[HotpotExample]:
    """All examples of one or more files (layout detected per record); duplicate ids are an error."""
    if isinstance(paths, str | Path):
        paths = [paths]
    examples: list[HotpotExample] = []
    seen: dict[str, Path] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"HotpotQA file {path} does not exist")
        for where, record in _records(path):
            ex = parse_record(path, where, record, require_answer=require_answer)
            if ex.id in seen:
                raise UserError(f"{path}: record {where}: question id {ex.id!r} already read from "
                                f"{seen[ex.id]}")
            seen[ex.id] = path
            examples.append(ex)
    if not examples:
        raise UserError(f"no HotpotQA records in {', '.join(map(str, paths))}")
    return examples


# ----------------------------------------------------------------------------------------------- builder

Paragraph = tuple[str, str]


def render_document(paragraphs: Sequence[Paragraph]) -> str:
    """ "Document i:" blocks (title line, then text) separated by blank lines: the RULER / MemAgent format."""
    return "\n\n".join(f"Document {i}:\n{title}\n{text}"
                       for i, (title, text) in enumerate(paragraphs, start=1))


def paragraph_pool(examples: Sequence[HotpotExample]) -> list[Paragraph]:
    """Every distinct (title, text) paragraph of ``examples``, in first-seen order (reproducible)."""
    return list(dict.fromkeys(p for ex in examples for p in ex.paragraphs))


def parse_sizes(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"50,100,200"`` -> (50, 100, 200): sorted, distinct, positive."""
    if isinstance(spec, str):
        try:
            values = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--num-docs {spec!r}: expected comma-separated integers, "
                            "e.g. 50,100,200") from None
    else:
        values = [int(v) for v in spec]
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--num-docs {spec!r}: expected one or more positive integers, e.g. 50,100,200")
    return tuple(sorted(set(values)))


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator that depends only on the seed and ``parts`` (str seeds are hashed with SHA-512)."""
    return random.Random(":".join(map(str, (seed, *parts))))


def select_questions(examples: Sequence[HotpotExample], num_questions: int | None, seed: int,
                     drop: Callable[[list[HotpotExample]], set[str]] | None = None) -> list[HotpotExample]:
    """``num_questions`` questions (all if None) in a seeded order, skipping those with no gold paragraph.

    ``drop`` (the closed-book filter) sees candidates in batches and returns the ids to leave out; it is
    asked only about as many questions as needed, so an expensive filter stays cheap.
    """
    order = [ex for ex in examples if ex.gold_paragraphs()]
    _rng(seed, "questions").shuffle(order)
    want = len(order) if num_questions is None else num_questions
    if num_questions is not None and num_questions > len(order):
        raise UserError(f"--num-questions {num_questions}: only {len(order)} questions with gold paragraphs "
                        "are available")
    chosen: list[HotpotExample] = []
    pos = 0
    while len(chosen) < want and pos < len(order):
        batch = order[pos : pos + max(2 * (want - len(chosen)), 16)]
        pos += len(batch)
        dropped = drop(batch) if drop is not None else set()
        chosen.extend(ex for ex in batch if ex.id not in dropped)
    if len(chosen) < want:
        raise UserError(f"--num-questions {want}: only {len(chosen)} questions are left after the "
                        "closed-book filter; ask for fewer or give more questions")
    return chosen[:want]


class DistractorPool:
    """The distractor paragraphs, with the per-question exclusions the builder needs."""

    def __init__(self, paragraphs: Sequence[Paragraph]):
        self.paragraphs = list(dict.fromkeys(paragraphs))
        self._index = {p: i for i, p in enumerate(self.paragraphs)}
        self._by_title: dict[str, list[int]] = {}
        for i, (title, _) in enumerate(self.paragraphs):
            self._by_title.setdefault(title, []).append(i)

    def __len__(self) -> int:
        return len(self.paragraphs)

    def excluded(self, example: HotpotExample) -> set[int]:
        """Pool rows that must not be distractors: the question's own paragraphs and any other version of
        a gold article (which would leak or contradict the supporting facts)."""
        out = {self._index[p] for p in example.paragraphs if p in self._index}
        for title in example.gold_titles:
            out.update(self._by_title.get(title, ()))
        return out

    def draw(self, example: HotpotExample, count: int, seed: int) -> list[Paragraph]:
        """``count`` distinct distractors for ``example``; a smaller count gives a prefix of a larger one."""
        excluded = self.excluded(example)
        usable = len(self.paragraphs) - len(excluded)
        if count > usable:
            raise UserError(f"question {example.id!r} needs {count} distractor paragraphs but the pool has "
                            f"only {usable} usable; use fewer --num-docs or add HotpotQA files (--pool)")
        rng = _rng(seed, "distractors", example.id)
        picked: list[int] = []
        seen = set(excluded)
        while len(picked) < count:  # sequential rejection sampling: the prefix property holds for any count
            i = rng.randrange(len(self.paragraphs))
            if i not in seen:
                seen.add(i)
                picked.append(i)
        return [self.paragraphs[i] for i in picked]


def build_example(example: HotpotExample, pool: DistractorPool, num_docs: int, seed: int,
                  own_distractors: bool = False) -> dict[str, Any]:
    """One row at one size: gold paragraphs (+ optionally the question's own HotpotQA distractors) plus
    pool distractors up to ``num_docs``, shuffled by a generator of (seed, question, size)."""
    fixed = example.gold_paragraphs()
    if own_distractors:
        fixed += [p for p in example.paragraphs if p not in fixed]
    if num_docs < len(fixed):
        raise UserError(f"--num-docs {num_docs}: question {example.id!r} already has {len(fixed)} gold"
                        f"{' and own' if own_distractors else ''} paragraphs")
    docs = fixed + pool.draw(example, num_docs - len(fixed), seed)
    _rng(seed, "order", example.id, num_docs).shuffle(docs)
    gold = set(example.gold_paragraphs())
    return {
        "id": example.id,
        "question": example.question,
        "answers": [example.answer],
        "context": render_document(docs),
        "num_docs": num_docs,
        "gold_titles": list(example.gold_titles),
        "gold_positions": [i for i, p in enumerate(docs, start=1) if p in gold],
        "type": example.type,
        "level": example.level,
    }


def build_longqa(examples: Sequence[HotpotExample], sizes: Sequence[int], num_questions: int | None,
                 seed: int, pool: Sequence[Paragraph] | None = None, own_distractors: bool = False,
                 drop: Callable[[list[HotpotExample]], set[str]] | None = None,
                 ) -> dict[int, list[dict[str, Any]]]:
    """Rows per size for the same selected questions; ``pool`` defaults to all paragraphs of ``examples``."""
    sizes = parse_sizes(sizes)
    distractors = DistractorPool(pool if pool is not None else paragraph_pool(examples))
    questions = select_questions(examples, num_questions, seed, drop=drop)
    return {n: [build_example(ex, distractors, n, seed, own_distractors) for ex in questions] for n in sizes}


# ----------------------------------------------------------------------------------------- closed-book filter


def closed_book_filter(engine: Engine, tokenizer: Any, model_name: str, cache_path: str | Path | None = None,
                       max_tokens: int = 64, templates: Mapping[str, str] | None = None,
                       ) -> Callable[[list[HotpotExample]], set[str]]:
    """A ``drop`` function for ``select_questions``: ids of questions the model answers (normalised EM)
    with no context at all, greedy. Answers are cached per (model, prompt, budget) in a JSONL file, so a
    rebuild or a bigger ``--num-questions`` only asks about new questions."""

    key = hashlib.sha256(f"{model_name}\n{template('closed_book', templates)}\n{max_tokens}".encode())
    if cache_path is None:

        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.strip("/"))[-60:]
        cache_path = home() / "cache" / "longqa-closed-book" / f"{slug}-{key.hexdigest()[:12]}.jsonl"
    cache_path = Path(cache_path)
    cached = {r["id"]: r for r in read_jsonl(cache_path)} if cache_path.is_file() else {}

    def drop(batch: list[HotpotExample]) -> set[str]:
        todo = [ex for ex in batch if ex.id not in cached]
        if todo:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            requests = []
            for ex in todo:
                text, ids = render(tokenizer, "closed_book", templates, problem=ex.question)
                requests.append(GenerationRequest(prompt_ids=ids, params=params, prompt_text=text))
            outputs = engine.generate(requests)
            records = []
            for ex, completions in zip(todo, outputs, strict=True):
                prediction = completions[0].text
                records.append({"id": ex.id, "question": ex.question, "answer": ex.answer,
                                "prediction": prediction, "em": score(prediction, ex.answer)["em"]})
            append_jsonl(cache_path, records)
            cached.update((r["id"], r) for r in records)
        return {ex.id for ex in batch if cached[ex.id]["em"] >= 1.0}

    return drop


# ---------------------------------------------------------------------------------------------- writing

INDEX_FILE = "longqa.json"


def size_dir(num_docs: int) -> str:
    return f"docs_{num_docs}"


def _schema(with_tokens: bool) -> pa.Schema:
    fields = [("id", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string())),
              ("context", pa.string()), ("num_docs", pa.int32()), ("gold_titles", pa.list_(pa.string())),
              ("gold_positions", pa.list_(pa.int32())), ("type", pa.string()), ("level", pa.string())]
    if with_tokens:
        fields.append(("num_tokens", pa.int32()))
    return pa.schema(fields)


def write_longqa(out: str | Path, rows_by_size: Mapping[int, list[dict[str, Any]]], info: Mapping[str, Any],
                 train: bool = False, tokenizer: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the built rows: ``--train`` -> one dataset in ``out``; else one dataset per size in
    ``out/docs_N`` plus ``out/longqa.json`` (sizes, question ids, build info). All or nothing."""
    out = Path(out)
    with_tokens = tokenizer is not None

    def rows(size: int) -> Iterator[dict[str, Any]]:
        for row in rows_by_size[size]:
            if with_tokens:
                ids = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
                row = {**row, "num_tokens": len(ids)}
            yield row

    if train:
        if len(rows_by_size) != 1:
            raise UserError(f"--train builds one document size; got --num-docs {sorted(rows_by_size)}")
        (size,) = rows_by_size
        return write_dataset(out, rows(size), _schema(with_tokens), "longqa", info={**info, "num_docs": size},
                             overwrite=overwrite)
    sizes = sorted(rows_by_size)
    index = {"task": "longqa", "sizes": sizes, "dirs": {str(n): size_dir(n) for n in sizes},
             "question_ids": [r["id"] for r in rows_by_size[sizes[0]]], **info}
    parts = {size_dir(n): (rows(n), {**info, "num_docs": n}) for n in sizes}
    return write_eval_set(out, INDEX_FILE, parts, _schema(with_tokens), "longqa", index, overwrite)


def eval_sets(data_dir: str | Path) -> list[tuple[int, Path]]:
    """(num_docs, dataset dir) of a built longqa eval set, by size; a single dataset dir is one size."""
    data_dir = Path(data_dir)
    index = data_dir / INDEX_FILE
    if index.is_file():
        meta = json.loads(index.read_text(encoding="utf-8"))
        return [(int(n), data_dir / d) for n, d in sorted(meta["dirs"].items(), key=lambda kv: int(kv[0]))]
    manifest = read_manifest(data_dir)
    if manifest.get("task") != "longqa" or "num_docs" not in manifest:
        raise UserError(f"{data_dir}: neither a longqa eval set ({INDEX_FILE}) nor a longqa dataset "
                        "(build one with `memtrain data longqa`)")
    return [(int(manifest["num_docs"]), data_dir)]
