"""The masking rule, candidate filters, NER-only spaCy pipelines and the on-disk entity cache."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from data_helpers import TOPICS, build_ruler_ner
from memtrain.assets import AssetError
from memtrain.data.entities import EntityCache, EntityTagger, candidates, load_ner
from memtrain.data.leaks import find_leaks
from memtrain.data.masking import (
    count_matches,
    is_usable,
    mask_entity,
    mask_forms,
    normalize_spans,
    repair_span,
    shift_spans,
    span_problem,
    strip_determiner,
    surname,
    variant_forms,
)


@pytest.fixture(scope="module")
def ruler_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_ruler_ner(tmp_path_factory.mktemp("ruler-ner")))


def test_masking_rule_case_possessive_boundaries_and_spacing() -> None:
    text = (
        "Paris is big. PARIS, paris! Paris's museums; Parisian cafes; New\nYork and New  York; "
        "O’Brien met O'Brien."
    )
    masked, spans = mask_entity(text, "Paris", "[MASK]")
    # any capitalisation with a capital letter is the entity; the all-lower-case word is not
    assert masked.startswith("[MASK] is big. [MASK], paris! [MASK]'s museums; Parisian cafes")
    assert len(spans) == 3 and all(text[a:b].lower() == "paris" for a, b in spans)
    assert count_matches(masked, "Paris") == 0
    masked, _ = mask_entity(text, "New York", "[MASK]")
    assert "[MASK] and [MASK];" in masked  # any whitespace between the entity's words
    masked, _ = mask_entity(text, "O'Brien", "[MASK]")
    assert masked.endswith("[MASK] met [MASK].")  # typographic and plain apostrophes are the same


def test_capitalised_entities_never_mask_common_words() -> None:
    """The case rule: "May" is not the verb "may", "US" is not "us" (they were masked before)."""
    text = "In May 2009 we may go; the US told us so. MAY and US again."
    masked, spans = mask_entity(text, "May", "[M]")
    assert masked == "In [M] 2009 we may go; the US told us so. [M] and US again." and len(spans) == 2
    masked, _ = mask_entity(text, "US", "[M]")
    assert masked == "In May 2009 we may go; the [M] told us so. MAY and [M] again."
    # entities without capitals ignore case as before
    masked, _ = mask_entity("the 19th century and the 19TH CENTURY", "19th century", "[M]")
    assert masked == "the [M] and the [M]"


def test_common_lower_case_words_are_not_candidates_and_determiners_are_stripped() -> None:
    text = "The United States sent one ship in the 19th century; the Hague and The Beatles; first summer."
    spans = []
    named = [("The United States", "GPE"), ("one", "CARDINAL"), ("the 19th century", "DATE"),
             ("the Hague", "GPE"), ("The Beatles", "ORG"), ("first", "ORDINAL"), ("summer", "DATE")]
    for ent, label in named:
        start = text.index(ent)
        spans.append((start, start + len(ent), label))
    got = candidates(text, spans)
    assert [(c.text, c.determiner) for c in got] == [
        ("United States", "The"), ("19th century", "the"), ("Hague", "the"), ("Beatles", "The")]
    assert all(text[c.start:c.end] == c.text for c in got)
    assert not is_usable("one", "CARDINAL") and not is_usable("two weeks", "DATE")
    assert is_usable("1889", "DATE") and is_usable("iPhone", "PRODUCT")
    assert strip_determiner("An Inconvenient Truth") == "Inconvenient Truth"
    assert strip_determiner("The") == "The"


def test_variants_are_masked_and_leaks_found() -> None:
    """What would give the entity away: punctuation variants, a person's surname, contained NER spans."""
    text = ("The U.S. army and the U.S navy; US ships, us. Barack Obama met Obama. In May 2009 (2009). "
            "1,000 or 1000 men.")
    assert find_leaks(mask_entity(text, "U.S.", "[M]")[0], "U.S.") == ["U.S."]  # exact masking leaks
    masked = mask_forms(text, "U.S.", "[M]")
    assert masked.text.startswith("The [M] army and the [M] navy; [M] ships, us.") and masked.variants == 2
    assert find_leaks(masked.text, "U.S.") == []
    assert surname("Barack Obama") == "Obama" and surname("Martin Luther King Jr.") == "King"
    assert surname("Obama") is None
    variants = variant_forms("Barack Obama", "PERSON", ["Obama", "Barack Obama"])
    assert variants == ["B.O.", "Obama"]  # dotted initials of every multi-word name, the surname of a PERSON
    assert find_leaks(mask_entity(text, "Barack Obama", "[M]")[0], "Barack Obama", variants) == ["Obama"]
    masked = mask_forms(text, "Barack Obama", "[M]", variants)
    assert "[M] met [M]." in masked.text and masked.count == 2 and masked.variants == 1
    variants = variant_forms("May 2009", "DATE", ["2009", "U.S.", "the May 2009"])
    assert variants == ["2009"]
    masked = mask_forms(text, "May 2009", "[M]", variants)
    assert "In [M] ([M])." in masked.text and find_leaks(masked.text, "May 2009", variants) == []
    assert mask_forms(text, "1,000", "[M]").text.endswith("[M] or [M] men.")


def test_masking_rule_for_entities_with_punctuation() -> None:
    text = "The U.S. economy and U.S.A. differ; it cost $5 million, not US$5 or $50."
    masked, spans = mask_entity(text, "U.S.", "[X]")
    assert masked.startswith("The [X] economy and U.S.A. differ") and len(spans) == 1
    masked, spans = mask_entity(text, "$5", "[X]")
    assert "cost [X] million, not US$5 or $50." in masked and len(spans) == 1


def test_masking_invariant_on_random_texts() -> None:
    rng = random.Random(7)
    vocab = [
        "Rome",
        "rome",
        "ROME",
        "Romes",
        "Rome's",
        "Roma",
        "the",
        "old",
        "Old Rome",
        "old  rome",
        "x-Rome",
        "Rome-based",
        "[MASK]",
        "3",
        "33",
        "3rd",
        "1889",
        "'89",
    ]
    for _ in range(300):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30)))
        entity = rng.choice(["Rome", "Old Rome", "3", "1889", "Rome's"])
        masked, spans = mask_entity(text, entity, "[MASK]")
        assert count_matches(masked, entity) == 0, (text, entity)
        assert len(spans) == count_matches(text, entity)


def test_shift_spans_follow_the_masked_text() -> None:
    text = "Alice met Bob in Paris. Later Bob and Carol left Paris for Lyon with Bob."
    ents = [
        (0, 5, "PERSON"),
        (10, 13, "PERSON"),
        (17, 22, "GPE"),
        (30, 33, "PERSON"),
        (38, 43, "PERSON"),
        (49, 54, "GPE"),
        (59, 63, "GPE"),
        (69, 72, "PERSON"),
    ]
    assert [text[s:e] for s, e, _ in ents] == [
        "Alice",
        "Bob",
        "Paris",
        "Bob",
        "Carol",
        "Paris",
        "Lyon",
        "Bob",
    ]
    masked, replaced = mask_entity(text, "Paris", "[MASK]")
    moved = shift_spans(ents, replaced, len("[MASK]"), offset=100)
    doc = "x" * 100 + masked
    assert [(doc[s:e], lab) for s, e, lab in moved] == [
        ("Alice", "PERSON"),
        ("Bob", "PERSON"),
        ("Bob", "PERSON"),
        ("Carol", "PERSON"),
        ("Lyon", "GPE"),
        ("Bob", "PERSON"),
    ]
    # a span overlapping a replaced range is dropped, not mangled
    assert shift_spans([(10, 22, "X")], replaced, 6) == []


def test_candidate_filters_and_case_insensitive_dedup() -> None:
    text = (
        "Mars and MARS and the Red Planet. Mars, Mars, Mars again. Venus is near Earth. "
        "The Very Long Entity Name With Many Words Here. [bracketed] and %%%."
    )
    ents = []
    for ent, label in [
        ("Mars", "LOC"),
        ("MARS", "LOC"),
        ("Venus", "LOC"),
        ("Earth", "LOC"),
        ("Red Planet", "LOC"),
        ("The Very Long Entity Name With Many Words Here", "ORG"),
        ("[bracketed]", "ORG"),
        ("%%%", "MONEY"),
    ]:
        start = text.index(ent)
        ents.append((start, start + len(ent), label))
    got = candidates(text, ents)
    assert [c.text for c in got] == ["Venus", "Earth", "Red Planet"]  # Mars occurs 6 times (>= 5): excluded
    got = candidates(text, ents, max_occurrences=7)
    assert [c.text for c in got][:1] == ["Mars"] and "MARS" not in [c.text for c in got]  # first form kept
    assert [c.text for c in candidates(text, ents, labels=["ORG"])] == []  # long / bracketed ORGs fail
    assert [c.text for c in candidates(text, ents, max_words=20, labels=["ORG"])] == [
        "Very Long Entity Name With Many Words Here"  # the leading determiner is not part of the answer
    ]
    assert not is_usable("[MASK]", "ORG") and not is_usable("--", "ORG") and is_usable("1889", "DATE")


def test_normalize_spans_strips_possessives() -> None:
    text = "Newton's laws"
    assert normalize_spans(text, [(0, 8, "PERSON")]) == [(0, 6, "PERSON")]


def test_load_ner_keeps_only_entity_components(ruler_dir: str, tmp_path) -> None:
    import spacy

    nlp = load_ner(ruler_dir)
    assert nlp.pipe_names == ["entity_ruler"]
    assert [(e.text, e.label_) for e in nlp("Mozart visited Vienna in 1787.").ents] == [
        ("Mozart", "PERSON"),
        ("Vienna", "GPE"),
        ("1787", "DATE"),
    ]
    blank = spacy.blank("en")
    blank.add_pipe("sentencizer")
    blank.to_disk(tmp_path / "no-ner")
    with pytest.raises(ValueError, match="has no entity component \\(pipes: sentencizer\\)"):
        load_ner(str(tmp_path / "no-ner"))
    with pytest.raises(AssetError, match=r"ner path .*does-not-exist' does not exist"):
        load_ner(str(tmp_path / "does-not-exist"))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ValueError, match=r"cannot load it with spacy\.load"):
        load_ner(str(tmp_path / "not-a-model"))


def test_tagger_is_lazy_and_cached_on_disk(ruler_dir: str, tmp_path) -> None:
    texts = [
        f"{ent} and the {TOPICS['music']['words'][i]} in {1700 + i}."
        for i, (ent, _) in enumerate(TOPICS["music"]["ents"])
    ]
    calls: list[list[int]] = []

    def texts_of(rows):
        calls.append(list(rows))
        return [texts[r] for r in rows]

    tagger = EntityTagger(texts_of, "corpus-key", ruler_dir, tmp_path / "ner")
    got = tagger([3, 1, 3])
    assert calls == [[1, 3]] and tagger.tagged == 2
    assert [(texts[1][s:e], lab) for s, e, lab in got[1]] == [("Vienna", "GPE"), ("1701", "DATE")]
    tagger([1, 2])
    assert calls[-1] == [2] and tagger.tagged == 3  # only what is new
    tagger.close()
    again = EntityTagger(texts_of, "corpus-key", ruler_dir, tmp_path / "ner")  # a new run: from SQLite
    assert again([1, 2, 3]) == {1: got[1], 2: tagger([2])[2], 3: got[3]}
    assert again.tagged == 0 and again.cache_hits == 3 and len(calls) == 2
    other = EntityTagger(texts_of, "another-corpus", ruler_dir, tmp_path / "ner")  # keyed by corpus
    other([1])
    assert other.tagged == 1
    again.close()
    other.close()


def test_a_damaged_ner_cache_is_a_one_line_error_naming_it(tmp_path) -> None:
    path = tmp_path / "ner.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=rf"NER cache {re.escape(str(path))} is damaged .*delete it"):
        EntityCache(path)


@pytest.mark.slow
def test_spacy_sm_is_ner_only_and_parallel_matches_serial(spacy_model_dir, tmp_path) -> None:
    nlp = load_ner("spacy-sm")
    assert nlp.pipe_names == ["ner"]  # tok2vec is not needed: ner has its own embedding layer
    texts = [f"Marie Curie moved to Paris in {1891 + i} and won the Nobel Prize." for i in range(24)]
    serial = EntityTagger(lambda rows: [texts[r] for r in rows], "k", "spacy-sm", None, workers=1)
    parallel = EntityTagger(
        lambda rows: [texts[r] for r in rows], "k", "spacy-sm", None, workers=2, batch_size=4, min_parallel=1
    )
    a, b = serial(range(24)), parallel(range(24))
    assert a == b
    labels = {texts[0][s:e]: lab for s, e, lab in a[0]}
    assert labels.get("Marie Curie") == "PERSON" and labels.get("Paris") == "GPE"


@pytest.mark.parametrize(
    ("text", "entity", "label"),
    [
        ("The U.S. army and the US navy sailed.", "United States", "GPE"),  # dotted and plain initials
        ("He believed in a supreme being, the Supreme Being.", "Supreme Being", "ORG"),  # lower-case
        ("Flights to Sao Paulo and São Paulo.", "São Paulo", "GPE"),  # accent-folded
        ("Flights to São Paulo and Sao Paulo.", "Sao Paulo", "GPE"),  # ... either way round
        ("The Kennedys and Kennedy's brother.", "Kennedy", "PERSON"),  # plural
        ("The 1990s began in 1990.", "1990", "DATE"),
    ],
)
def test_leak_forms_are_masked_and_seen_by_the_independent_check(text: str, entity: str, label: str) -> None:
    """The four forms that once survived masking (#22): each is masked, and the leak check - which does not
    use the masker's patterns - sees each one when it is left in."""
    variants = variant_forms(entity, label)
    assert find_leaks(text, entity, variants), "the check must see the unmasked forms"
    masked = mask_forms(text, entity, "[MASK]", variants)
    assert find_leaks(masked.text, entity, variants) == [], masked.text
    assert masked.count >= 2


def test_the_case_rule_still_spares_common_words() -> None:
    assert find_leaks("you may go", "May") == [] and find_leaks("In May", "May") == ["May"]
    assert mask_forms("you may go in May", "May", "[M]").text == "you may go in [M]"
    assert find_leaks("tell us", "U.S.") == [] and find_leaks("[MASK] met [TARGET]", "Mask") == []


@pytest.mark.parametrize(
    ("raw", "repaired"),
    [
        ("Nobel Prize in Literature for his", "Nobel Prize in Literature"),
        ("Geographic North Pole or", "Geographic North Pole"),
        ("3500kg and", "3500kg"),
        ("Heliocentric (Sun", "Heliocentric"),
        ('"Southeast Asian', "Southeast Asian"),
        ("Paris.", "Paris"),
        ("U.S.", "U.S."),
        ("July 4, 1776", "July 4, 1776"),
        ("Sun (star)", "Sun (star)"),
    ],
)
def test_broken_spans_are_repaired_at_their_edges(raw: str, repaired: str) -> None:
    assert repair_span(raw) == repaired and repaired in raw
    assert span_problem(repaired) is None


@pytest.mark.parametrize(
    ("entity", "problem"),
    [
        ("1,01.325 millibars", "malformed_number"),
        ("N", "fragment"),
        ("Xi", "fragment"),
        ("Paris or", "trailing_fragment"),
        ("Heliocentric (Sun", "unbalanced"),
        ('"Southeast Asian', "leading_punctuation"),
        ("at least the 17th century", "leading_fragment"),
        ("UK", None),
        ("1,000", None),
        ("Washington, D.C.", None),
    ],
)
def test_span_problem_rules(entity: str, problem: str | None) -> None:
    assert span_problem(entity) == problem


def test_candidates_repair_or_reject_broken_spans_and_count_why() -> None:
    text = "He won the Nobel Prize in Literature for his work. N was 1,01.325 millibars in Paris."
    spans = [(11, 44, "WORK_OF_ART"), (51, 52, "ORG"), (57, 75, "QUANTITY"), (79, 84, "GPE")]
    assert [text[s:e] for s, e, _ in spans] == ["Nobel Prize in Literature for his", "N",
                                               "1,01.325 millibars", "Paris"]
    rejected: Counter[str] = Counter()
    found = candidates(text, spans, rejected=rejected)
    assert [(c.text, text[c.start:c.end]) for c in found] == [("Nobel Prize in Literature",) * 2,
                                                              ("Paris",) * 2]
    assert rejected == {"broken_span_repaired": 1, "broken_span_fragment": 1,
                        "broken_span_malformed_number": 1}
