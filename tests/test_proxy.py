"""Proxy-task documents: masking invariant, span correctness, token range, determinism, retrieval meaning."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_helpers import TOPICS, build_ruler_ner, make_articles, write_jsonl
from memtrain.data.corpus import PassageStore, open_store
from memtrain.data.dataset import load_rows, read_manifest
from memtrain.data.entities import load_ner
from memtrain.data.leaks import find_leaks
from memtrain.data.masking import (
    MaskedDocument,
    mask_document,
    mask_forms,
    names_a_header,
    span_problem,
    span_texts,
    strip_determiner,
    variant_forms,
)
from memtrain.data.proxy import PROXY_SCHEMA, ProxyConfig, build_proxy_dataset
from memtrain.data.related import open_index, related_passages
from memtrain.errors import UserError
from memtrain.prompts import MASK_TOKEN, PROXY_QUESTION

HEADER = re.compile(r"(?:^|\n\n)Document (\d+):\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("proxy")
    articles = make_articles(n_per_topic=10, seed=1)
    return {
        "root": root,
        "corpus": write_jsonl(root / "corpus.jsonl", articles),
        "ner": build_ruler_ner(root / "ruler"),
        "tokenizer": tiny_model_dir,
        "cache": root / "cache",
    }


def _cfg(env: dict[str, Path], out: str, **kw) -> ProxyConfig:
    base = dict(
        corpus=str(env["corpus"]),
        out=str(env["root"] / out),
        ner_model=str(env["ner"]),
        tokenizer=str(env["tokenizer"]),
        retriever="bm25",
        cache_dir=str(env["cache"]),
        passages=8,
        related=3,
        min_tokens=0,
        max_tokens=100_000,
        num_docs=12,
        workers=1,
    )
    return ProxyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(env) -> tuple[dict, list[dict]]:
    manifest = build_proxy_dataset(_cfg(env, "base"))
    return manifest, load_rows(env["root"] / "base")


def _passages(context: str) -> list[tuple[int, str]]:
    """(start offset, text) of each passage body, from the headers."""
    heads = list(HEADER.finditer(context))
    out = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(context)
        out.append((m.end(), context[m.end() : end]))
    return out


def test_rows_have_the_schema_headers_and_masking_invariant(env, built) -> None:
    manifest, rows = built
    assert manifest["task"] == "proxy" and manifest["num_rows"] == len(rows) == 12
    assert manifest["columns"] == {f.name: str(f.type) for f in PROXY_SCHEMA}
    assert len({r["id"] for r in rows}) == 12 and rows[0]["id"] == "proxy-42-000000"
    store = PassageStore(Path(manifest["corpus"]["store"]))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["tokenizer"])
    nlp = load_ner(str(env["ner"]))
    for r in rows:
        ctx, answer = r["context"], r["answers"][0]
        assert r["question"] == PROXY_QUESTION and len(r["answers"]) == 1
        numbers = [int(m.group(1)) for m in HEADER.finditer(ctx)]
        assert numbers == list(range(1, r["num_passages"] + 1)) == list(range(1, len(r["passage_ids"]) + 1))
        assert len(set(r["passage_ids"])) == r["num_passages"] and r["num_related"] <= 3
        # the invariant: the answer matches nowhere in the document under the masking rule
        assert find_leaks(ctx, answer) == []
        assert ctx.count(MASK_TOKEN) == r["num_masked"] >= 1 and r["num_masked"] <= 10
        # the answer is an entity of the pivot, exactly as it appears there, and the pivot is masked
        pivot_text = store.text(r["passage_ids"][r["pivot_position"] - 1])
        assert (
            answer in pivot_text
            and store.title(r["passage_ids"][r["pivot_position"] - 1]) == r["pivot_title"]
        )
        assert MASK_TOKEN in _passages(ctx)[r["pivot_position"] - 1][1]
        # each passage is the corpus passage with the answer and its variants (re-derived here from the NER
        # of every passage of the document) masked; no variant survives
        texts = [store.text(pid) for pid in r["passage_ids"]]
        others = [e.text for t in texts for e in nlp(t).ents]
        variants = variant_forms(answer, r["entity_label"], others)
        assert find_leaks(ctx, answer, variants) == []
        for (_, body), text in zip(_passages(ctx), texts, strict=True):
            assert mask_forms(text, answer, MASK_TOKEN, variants).text == body
        assert r["num_tokens"] == len(tok(ctx, add_special_tokens=False)["input_ids"])


def test_entity_spans_are_exactly_the_entities_of_the_masked_document(env, built) -> None:
    _, rows = built
    nlp = load_ner(str(env["ner"]))
    for r in rows:
        ctx = r["context"]
        spans = [(s["start"], s["end"], s["label"]) for s in r["entity_spans"]]
        assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        masks = [(m.start(), m.end()) for m in re.finditer(re.escape(MASK_TOKEN), ctx)]
        for s, e, _ in spans:
            assert ctx[s:e].strip() == ctx[s:e] and not any(a < e and s < b for a, b in masks)
            assert find_leaks(ctx[s:e], r["answers"][0]) == []
        # the rule-based NER finds exactly these entities (text and label) when run on the masked document
        expected = [(e.start_char, e.end_char, e.label_) for e in nlp(ctx).ents]
        assert spans == expected


def test_same_inputs_and_seed_give_byte_identical_rows(env, built) -> None:
    manifest, rows = built
    warm = build_proxy_dataset(_cfg(env, "again", workers=2))  # warm caches, other worker count
    cold = build_proxy_dataset(_cfg(env, "cold", cache_dir=str(env["root"] / "cache2")))  # nothing cached
    assert cold["ner_cache"]["cache_hits"] == 0 and warm["ner_cache"]["passages_tagged_now"] == 0
    for other, name in ((warm, "again"), (cold, "cold")):
        assert [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]]
        assert load_rows(env["root"] / name) == rows
    reseeded = load_rows(build_proxy_dataset(_cfg(env, "seed7", seed=7))["params"]["out"])
    assert [r["context"] for r in reseeded] != [r["context"] for r in rows]


def test_skipped_pivots_are_counted_and_ner_is_lazy(built) -> None:
    manifest, _ = built
    counts, skipped = manifest["counts"], manifest["skipped"]
    assert skipped.get("pivot_without_usable_entity", 0) >= 1  # the corpus has entity-free passages
    assert counts["pivot_candidates"] == counts["pivots_tried"] + skipped["pivot_without_usable_entity"]
    assert counts["documents"] == 12 and sum(manifest["entity_label_counts"].values()) == 12
    assert (
        manifest["ner_cache"]["passages_tagged_now"] < manifest["corpus"]["passages"]
    )  # only what was drawn
    assert manifest["corpus"]["passages"] == 120 and manifest["pivot_epochs"] == 1


def test_documents_outside_the_token_range_are_trimmed(env, built) -> None:
    manifest, _ = built
    per_passage = manifest["feasibility"]["mean_passage_tokens"]
    limit = int(per_passage * 5)
    m = build_proxy_dataset(_cfg(env, "short", max_tokens=limit, min_tokens=int(per_passage * 3)))
    rows = load_rows(env["root"] / "short")
    assert all(per_passage * 3 <= r["num_tokens"] <= limit for r in rows)
    assert all(r["num_passages"] < 8 for r in rows) and m["counts"]["passages_dropped_for_length"] > 0
    for r in rows:  # the pivot is never dropped
        assert MASK_TOKEN in _passages(r["context"])[r["pivot_position"] - 1][1]


def test_clear_errors_for_impossible_requests(env, tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"have about \d+ tokens .*below --min-tokens 1000000; use about --passages"
    ):
        build_proxy_dataset(_cfg(env, "x1", min_tokens=1_000_000, max_tokens=2_000_000))
    with pytest.raises(ValueError, match=r"has 120 passages, but --passages 500 needs at least"):
        build_proxy_dataset(_cfg(env, "x2", passages=500))
    plain = write_jsonl(
        tmp_path / "plain.jsonl",
        [
            {"title": f"T{i}", "text": f"The plain words of passage number {i} carry no names whatsoever."}
            for i in range(20)
        ],
    )
    with pytest.raises(ValueError, match="has a usable entity"):
        build_proxy_dataset(_cfg(env, "x3", corpus=str(plain), passages=4, related=1))
    with pytest.raises(ValueError, match="related=8 must be below passages=8"):
        _cfg(env, "x4", related=8)
    with pytest.raises(ValueError, match="no output directory"):
        build_proxy_dataset(_cfg(env, "x5").model_copy(update={"out": None}))
    assert not any((env["root"] / n).exists() for n in ("x1", "x2", "x3"))


def test_output_directory_is_protected(env, built) -> None:
    other = env["root"] / "not-a-dataset"
    other.mkdir()
    (other / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not empty and holds no manifest\.json; refusing"):
        build_proxy_dataset(_cfg(env, "not-a-dataset"))
    assert (other / "precious.txt").read_text(encoding="utf-8") == "keep me"
    with pytest.raises(ValueError, match="already holds a dataset; pass --overwrite"):
        build_proxy_dataset(_cfg(env, "base"))
    m = build_proxy_dataset(_cfg(env, "base", overwrite=True, num_docs=3))
    assert m["num_rows"] == 3 and read_manifest(env["root"] / "base")["num_rows"] == 3


def _mask(texts: list[str], ents: dict[int, list], answer: str, label: str,
          max_masks: int = 10) -> MaskedDocument | str:
    """The proxy builder's masking step on passages ``texts`` (NER spans ``ents`` by passage)."""
    others = span_texts(list(range(len(texts))), texts, ents)
    return mask_document([ents[i] for i in range(len(texts))], texts, answer, label, others, max_masks)


def test_an_answer_that_would_hit_a_header_is_rejected() -> None:
    ents = {0: [], 1: [(4, 5, "CARDINAL")]}
    assert _mask(["Some text.", "Has 2 cats."], ents, "2", "CARDINAL") == "variant_survives"  # "Document 2:"
    built = _mask(["Some text.", "Has 3 cats."], ents, "3", "CARDINAL")
    assert isinstance(built, MaskedDocument)
    assert built.text == "Document 1:\nSome text.\n\nDocument 2:\nHas [MASK] cats."
    assert built.spans == [] and built.masks == 1


def test_variants_are_masked_in_every_passage_and_counted() -> None:
    """Masking "Barack Obama" used to leave "Obama", "the United States" to leave "United States"."""
    texts = ["Barack Obama visited the U.S. in May.", "Obama said the US may act.", "Paris is in France."]
    named = [[("Barack Obama", "PERSON"), ("the U.S.", "GPE"), ("May", "DATE")], [("Obama", "PERSON"),
             ("the US", "GPE")], [("Paris", "GPE"), ("France", "GPE")]]
    ents = {i: [(t.index(e), t.index(e) + len(e), lab) for e, lab in named[i]] for i, t in enumerate(texts)}
    built = _mask(texts, ents, "Barack Obama", "PERSON")
    assert isinstance(built, MaskedDocument)
    doc, spans, masks, variants, variants_masked = built.astuple()
    assert variants == ["B.O.", "Obama"] and masks == 2 and variants_masked == 1
    assert "[MASK] visited the U.S." in doc and "[MASK] said the US may act." in doc
    # the spans IMR may use skip the masked ones; "U.S."/"US" stay (they are other entities here)
    assert [doc[s["start"]:s["end"]] for s in spans] == ["U.S.", "May", "US", "Paris", "France"]
    built = _mask(texts, ents, "U.S.", "GPE")
    assert isinstance(built, MaskedDocument)
    assert "visited the [MASK] in May." in built.text and "said the [MASK] may act" in built.text
    assert built.variants_masked == 1


def test_entities_needing_too_many_masks_are_not_used() -> None:
    texts = ["Rome and Rome.", "Rome, Rome!", "Lyon."]
    ents = {0: [(0, 4, "GPE"), (9, 13, "GPE")], 1: [(0, 4, "GPE"), (6, 10, "GPE")], 2: [(0, 4, "GPE")]}
    assert _mask(texts, ents, "Rome", "GPE", max_masks=3) == "too_many_masks"
    assert isinstance(_mask(texts, ents, "Lyon", "GPE", max_masks=3), MaskedDocument)


def test_manifest_records_mask_counts_variants_and_a_zero_leak_rate(built) -> None:
    manifest, rows = built
    m = manifest["masking"]
    assert m["leak_rate"] == 0.0 and m["leaked_docs"] == 0 and m["max_masks"] == 10
    assert sum(m["masks_per_doc"]["histogram"].values()) == len(rows)
    assert m["masks_per_doc"]["max"] == max(r["num_masked"] for r in rows) <= 10
    assert m["docs_with_variants_masked"] == sum(r["num_variants_masked"] > 0 for r in rows)


def test_related_passages_share_the_pivot_topic(env) -> None:
    cfg = _cfg(env, "unused")
    store = open_store(cfg.corpus, Path(cfg.cache_dir))
    index, _, _ = open_index(store, cfg, Path(cfg.cache_dir))
    topic_of = {ent: t for t, v in TOPICS.items() for ent, _ in v["ents"]}
    topic_of.update({w: t for t, v in TOPICS.items() for w in v["words"]})

    def topic(row: int) -> str:
        words = re.findall(r"[a-z]+", store.text(row))
        return max(TOPICS, key=lambda t: sum(w in TOPICS[t]["words"] for w in words))

    rng = np.random.default_rng(0)
    pivots = [int(r) for r in rng.choice(len(store), 30, replace=False)]
    related = related_passages(index, store, pivots, 5)
    same_related = np.mean(
        [topic(r) == topic(p) for p, rel in zip(pivots, related, strict=True) for r in rel]
    )
    same_random = np.mean([topic(int(r)) == topic(p) for p in pivots for r in rng.choice(len(store), 5)])
    assert all(p not in rel and len(rel) == 5 for p, rel in zip(pivots, related, strict=True))
    assert same_related >= 0.9 and same_related - same_random > 0.5


# ------------------------------------------------------------------------------------------- embedded corpus


def _entity_overlap(ents_a: set[str], ents_b: set[str]) -> int:
    return len(ents_a & ents_b)


def _retrieval_gap(store: PassageStore, index, tagger_rows, pivots: list[int], n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    related = related_passages(index, store, pivots, n)
    randoms = [[int(r) for r in rng.choice(len(store), n, replace=False) if r != p] for p in pivots]
    ents = tagger_rows([*pivots, *(r for rel in related for r in rel), *(r for rr in randoms for r in rr)])

    def names(row: int) -> set[str]:
        text = store.text(row)
        return {text[s:e].casefold() for s, e, lab in ents[row] if lab not in ("CARDINAL", "ORDINAL")}

    rel_score = np.mean(
        [_entity_overlap(names(p), names(r)) for p, rel in zip(pivots, related, strict=True) for r in rel]
    )
    rnd_score = np.mean(
        [_entity_overlap(names(p), names(r)) for p, rr in zip(pivots, randoms, strict=True) for r in rr]
    )
    return rel_score, rnd_score


def _title_pivots(store: PassageStore, count: int, seed: int) -> list[int]:
    """Pivots whose article title occurs in some other article's passage (so related passages exist)."""
    texts = store.all_texts()
    articles = store.articles(list(range(len(store))))
    titles = store.titles(list(range(len(store))))
    out = []
    for r in np.random.default_rng(seed).permutation(len(store)):
        t = titles[r]
        if len(t) >= 4 and any(t in texts[j] and articles[j] != articles[r] for j in range(len(texts))):
            out.append(int(r))
            if len(out) == count:
                break
    return out


@pytest.mark.slow
def test_embedded_corpus_bm25_related_share_more_entities(
    wiki_corpus_path, spacy_model_dir, tmp_path
) -> None:
    from memtrain.data.entities import EntityTagger

    cfg = ProxyConfig(retriever="bm25", cache_dir=str(tmp_path))
    store = open_store("wikipedia-vital", tmp_path)
    index, _, _ = open_index(store, cfg, tmp_path)
    tagger = EntityTagger(store.texts, store.key, "spacy-sm", tmp_path / "ner", workers=1)
    rel, rnd = _retrieval_gap(store, index, tagger, _title_pivots(store, 30, 0), 8, 0)
    tagger.close()
    assert rel > 0.5 and rel > 4 * rnd, (rel, rnd)


@pytest.mark.slow
def test_embedded_corpus_dense_related_share_more_entities(
    wiki_corpus_path, spacy_model_dir, minilm_dir, tmp_path
) -> None:
    from memtrain.data.entities import EntityTagger

    cfg = ProxyConfig(retriever="dense", cache_dir=str(tmp_path), max_articles=200)
    store = open_store("wikipedia-vital", tmp_path, max_articles=200)
    index, _, _ = open_index(store, cfg, tmp_path)
    tagger = EntityTagger(store.texts, store.key, "spacy-sm", tmp_path / "ner", workers=1)
    rel, rnd = _retrieval_gap(store, index, tagger, _title_pivots(store, 15, 1), 5, 1)
    tagger.close()
    assert rel > 0.3 and rel > 3 * rnd, (rel, rnd)


@pytest.mark.slow
def test_demo_sized_build_on_the_embedded_corpus(
    wiki_corpus_path, spacy_model_dir, smollm2_dir, tmp_path
) -> None:
    cfg = ProxyConfig(
        out=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        retriever="bm25",
        passages=8,
        related=3,
        min_tokens=300,
        max_tokens=2000,
        num_docs=16,
    )
    manifest = build_proxy_dataset(cfg)
    rows = load_rows(tmp_path / "demo")
    assert len(rows) == 16 and all(300 <= r["num_tokens"] <= 2000 for r in rows)
    assert manifest["ner_cache"]["passages_tagged_now"] < 600  # lazy: not the 10k-passage corpus
    store = PassageStore(Path(manifest["corpus"]["store"]))
    nlp = load_ner("spacy-sm")
    for r in rows:
        ctx, answer = r["context"], r["answers"][0]
        found = {(e.text, e.label_) for pid in r["passage_ids"] for e in nlp(store.text(pid)).ents}
        found |= {(t.removesuffix("'s").removesuffix("’s"), lab) for t, lab in found}
        found |= {(strip_determiner(t), lab) for t, lab in found}
        # real spaCy spans: no surname, punctuation variant or contained span of the answer survives
        variants = variant_forms(answer, r["entity_label"], [t for t, _ in found])
        assert find_leaks(ctx, answer, variants) == [], (answer, variants)
        assert not re.match(r"(?i)(the|a|an)\s", answer) and r["num_masked"] <= 10
        assert span_problem(answer) is None and not names_a_header(answer, r["num_passages"])
        for s in r["entity_spans"]:  # an NER span, repaired at its edges at most, never broken
            text = ctx[s["start"] : s["end"]]
            assert any(text in t and lab == s["label"] for t, lab in found), text
            assert span_problem(text) is None and not names_a_header(text, r["num_passages"])
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["models"]["ner"]["name"] in (
        "spacy-sm",
        "en_core_web_sm",
    )


def test_a_held_out_set_uses_no_article_of_the_sets_it_excludes(env) -> None:
    train = build_proxy_dataset(_cfg(env, "train-part", num_docs=3))
    held = build_proxy_dataset(
        _cfg(env, "held-out", num_docs=3, seed=11, exclude_from=[train["params"]["out"]]))
    store = PassageStore(Path(held["corpus"]["store"]))

    def articles(out: str) -> set[int]:
        return {a for r in load_rows(out) for a in store.articles(list(r["passage_ids"]))}

    used, fresh = articles(train["params"]["out"]), articles(held["params"]["out"])
    assert used and fresh and not used & fresh
    assert held["excluded"]["articles"] == len(used) and held["excluded"]["passages"] >= len(used)
    # the same seed without the exclusion draws on the excluded articles (so the test can fail)
    same_seed = build_proxy_dataset(_cfg(env, "held-out-free", num_docs=3, seed=11))
    assert articles(same_seed["params"]["out"]) & used


def test_excluding_a_dataset_of_another_corpus_is_a_clear_error(env, tmp_path) -> None:
    other = tmp_path / "other.jsonl"
    write_jsonl(other, make_articles(n_per_topic=3, seed=5))
    foreign = build_proxy_dataset(_cfg(env, "foreign", corpus=str(other), num_docs=1, passages=4, related=1))
    with pytest.raises(UserError, match=r"--exclude-from .*same corpus"):
        build_proxy_dataset(_cfg(env, "mixed", num_docs=1, exclude_from=[foreign["params"]["out"]]))
