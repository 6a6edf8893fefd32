"""Table-driven tests for memtrain.scoring: the reward and every eval metric depend on these edge cases."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from memtrain.scoring import (
    METRICS,
    REWARD_METRIC,
    answer_words,
    contains_answer,
    extract_answer,
    extract_boxed,
    extract_span,
    normalize_answer,
    normalize_math,
    score,
    score_multi,
)


def _m(strict_em: float, em: float, sub_em: float, f1: float) -> dict[str, float]:
    return {"strict_em": strict_em, "em": em, "sub_em": sub_em, "f1": f1}


ALL = _m(1.0, 1.0, 1.0, 1.0)
NONE = _m(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{42}", "42"),
        (r"so the result is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, on reflection \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed {7}", "7"),
        (r"\boxed{1} then \fbox{3}", "3"),
        (r"\boxed{   Paris  }", "Paris"),
        (r"\boxed{}", ""),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\boxed{5}}", "5"),
        (r"\boxed{a}}", "a"),
        ("\\boxed{line one\nline two}", "line one\nline two"),
        (r"\boxed{\text{Paris}}", r"\text{Paris}"),
        ("no box here", None),
        ("", None),
        (r"\boxed 5", None),
        (r"\boxedx{5}", None),
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed{1} and finally \boxed{2", None),
        (r"\boxed{\}", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("The answer is Paris.", "Paris"),
        ("Answer: Paris", "Paris"),
        ("ANSWER IS 7", "7"),
        ("the answer is: 42.", "42"),
        ("answer: paris\nExplanation: it is the capital.", "paris"),
        ("Answer: London. Wait, no. The final answer is Paris.", "Paris"),
        ("The answer isn't obvious", "The answer isn't obvious"),
        ("  I think it is Paris  ", "I think it is Paris"),
        ("", ""),
        (r"Answer: London. \boxed{Paris}", "Paris"),
        (r"\boxed{\text{Paris}}", "Paris"),
        (r"\boxed{\textbf{New} \mathrm{York}}", "New York"),
        (r"The answer is $\text{Rome}$.", "$Rome$"),
        (r"The answer is Paris \boxed{Paris", r"Paris \boxed{Paris"),
    ],
)
def test_extract_answer(prediction: str, expected: str) -> None:
    assert extract_answer(prediction) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        (r"\text{Paris}", "paris"),
        (r"\textbf{\text{Paris}}", "paris"),
        (r"\mathrm{cm}", "cm"),
        (r"\text{Paris", r"\text{paris"),
        ("$5$", "5"),
        (r"\$5", "5"),
        ("50%", "50"),
        (r"50\%", "50"),
        ("x = 3", "x=3"),
        (" 5. ", "5"),
        ("5..", "5."),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        ("1,000", "1,000"),
        ("", ""),
    ],
)
def test_normalize_math(text: str, expected: str) -> None:
    assert normalize_math(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Beatles", "beatles"),
        ("An apple a day", "apple day"),
        ("theatre anthem", "theatre anthem"),
        ("1,000", "1000"),
        ("1,000,000.", "1000000"),
        ("ＰＡＲＩＳ", "paris"),
        ("Ｚｕ\u0308ｒｉｃｈ", "zürich"),
        ("Zu\u0308rich", "zürich"),
        ("\u201cHello,\u201d she said\u2014twice!", "hello she saidtwice"),
        ("  lots \t of \n space  ", "lots of space"),
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        # Boxed answers: the reward and the QA metrics agree.
        (r"\boxed{Paris}", "Paris", ALL),
        (r"\boxed{\text{Paris}}", "Paris", ALL),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", ALL),
        (r"\boxed{50\%}", "50%", ALL),
        (r"$\boxed{\$5}$", "5", ALL),
        (r"\boxed{Paris.}", "paris", ALL),
        (r"\boxed{Zürich}", "Zürich", ALL),
        (r"\boxed{2} (earlier I wrote \boxed{3})", "3", ALL),
        # Math normalisation ignores spaces, SQuAD normalisation tokenises on them.
        (r"$\boxed{x = 3}$", "x=3", _m(1.0, 0.0, 0.0, 0.0)),
        # Thousands separators: em-equal, not strict-equal (the reward stays exact).
        (r"\boxed{1,000}", "1000", _m(0.0, 1.0, 1.0, 1.0)),
        # Unicode: NFKC only on the QA side; accents are significant.
        (r"\boxed{ＰＡＲＩＳ}", "Paris", _m(0.0, 1.0, 1.0, 1.0)),
        ("Zu\u0308rich", "Zürich", _m(0.0, 1.0, 1.0, 1.0)),
        (r"\boxed{Zurich}", "Zürich", NONE),
        # No box: strict_em is 0 but the QA metrics still see the answer.
        ("Paris", "Paris", _m(0.0, 1.0, 1.0, 1.0)),
        ("The answer is Paris.", "Paris", _m(0.0, 1.0, 1.0, 1.0)),
        ("Reasoning...\nAnswer: The Beatles\nDone.", "Beatles", _m(0.0, 1.0, 1.0, 1.0)),
        (r"Answer: London. \boxed{Paris}", "London", NONE),
        # An unclosed box is no box: fall back to the answer line.
        (r"The answer is Paris \boxed{Paris", "Paris", _m(0.0, 0.0, 1.0, 2 / 3)),
        # Empty outputs score nothing.
        ("", "Paris", NONE),
        (r"\boxed{}", "Paris", NONE),
        ("   ", "Paris", NONE),
        # Articles: a leading article never decides the reward (NER spans keep "the"), the rest stays strict.
        (r"\boxed{The Beatles}", "Beatles", ALL),
        (r"\boxed{United States}", "The United States", ALL),
        (r"\boxed{the United States}", "United States", ALL),
        (r"\boxed{A Tribe Called Quest}", "Tribe Called Quest", ALL),
        ("United States", "The United States", _m(0.0, 1.0, 1.0, 1.0)),
        (r"\boxed{United States of America}", "The United States", _m(0.0, 0.0, 1.0, 2 / 3)),
        (r"\boxed{Theatre}", "atre", NONE),
        ("a cat", "the cat", _m(0.0, 1.0, 1.0, 1.0)),
        # sub_em: the gold's tokens inside the prediction (gold-in-prediction), never the other way; f1
        # hand-computed.
        ("Barack Obama", "Obama", _m(0.0, 0.0, 1.0, 2 / 3)),
        ("Obama", "Barack Obama", _m(0.0, 0.0, 0.0, 2 / 3)),
        (r"\boxed{no}", "Norway", NONE),
        (r"\boxed{1}", "1889", NONE),
        ("born in 1889 in Paris", "1889", _m(0.0, 0.0, 1.0, 1 / 3)),
        ("18890", "1889", NONE),
        ("barack obama jr", "barack obama", _m(0.0, 0.0, 1.0, 0.8)),
        ("obama barack", "barack obama", _m(0.0, 0.0, 0.0, 1.0)),
        ("the cat sat", "a dog sat", _m(0.0, 0.0, 0.0, 0.5)),
        ("Paris", "London", NONE),
        # HotpotQA yes/no rule: no partial credit around yes / no / noanswer.
        (r"\boxed{yes}", "Yes", ALL),
        ("yes it is", "yes", _m(0.0, 0.0, 1.0, 0.0)),
        ("no", "no way", _m(0.0, 0.0, 0.0, 0.0)),
        ("No.", "no", _m(0.0, 1.0, 1.0, 1.0)),
        ("noanswer", "no answer", _m(0.0, 0.0, 0.0, 0.0)),
        # Several golds: each metric is the max over golds.
        (r"\boxed{NYC}", ["New York City", "NYC"], ALL),
        ("New York", ["New York City", "York"], _m(0.0, 0.0, 1.0, 0.8)),
        (r"\boxed{4}", ("four", "4"), ALL),
        (r"\boxed{5}", ["four", "4"], NONE),
    ],
)
def test_score(prediction: str, gold: str | list[str], expected: dict[str, float]) -> None:
    got = score(prediction, gold)
    assert {k: got[k] for k in expected} == pytest.approx(expected)


def test_score_returns_every_metric_in_order() -> None:
    assert list(score(r"\boxed{x}", "x")) == list(METRICS)
    assert list(score_multi(r"\boxed{x}", [["x"]])) == list(METRICS)


def test_metric_constants() -> None:
    assert METRICS == ("strict_em", "em", "sub_em", "f1", "span_em", "span_f1")
    assert REWARD_METRIC == "strict_em"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score("Paris", []), "empty"),
        (lambda: score_multi(r"\boxed{Paris}", []), "objective"),
        (lambda: score_multi(r"\boxed{Paris; Rome}", [["Paris"], []]), "empty"),
    ],
)
def test_empty_gold_raises(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_score_multi_rejects_bare_string() -> None:
    with pytest.raises(TypeError, match="per objective"):
        score_multi(r"\boxed{Paris}", "Paris")


@pytest.mark.parametrize(
    ("prediction", "golds", "sep", "expected"),
    [
        (r"\boxed{Paris; Rome}", [["Paris"], ["Rome"]], ";", ALL),
        (r"\boxed{Paris; Rome}", [["Paris"], ["London"]], ";", _m(0.5, 0.5, 0.5, 0.5)),
        (r"\boxed{Paris}", [["Paris"], ["Rome"]], ";", _m(0.5, 0.5, 0.5, 0.5)),
        (r"\boxed{}", [["Paris"], ["Rome"]], ";", NONE),
        (r"\boxed{Rome; Paris}", [["Paris"], ["Rome"]], ";", NONE),
        (r"\boxed{a1; b2; c3}", [["a1"], ["b2"]], ";", ALL),
        (r"\boxed{Paris | Rome}", [["Paris"], ["Rome"]], "|", ALL),
        (r"\boxed{Paris; Rome}", [["Paris"], ["Rome"]], "|", _m(0.0, 0.0, 0.5, 1 / 3)),
        (r"\boxed{NYC; 1,000}", [["New York City", "NYC"], ["1000"]], ";", _m(0.5, 1.0, 1.0, 1.0)),
        (r"\boxed{\text{Paris}; \text{Rome}}", [["Paris"], ["Rome"]], ";", ALL),
        ("The answer is Paris; Rome.", [["Paris"], ["Rome"]], ";", _m(0.0, 1.0, 1.0, 1.0)),
        ("Paris; barack obama jr", [["Paris"], ["Barack Obama"]], ";", _m(0.0, 0.5, 1.0, 0.9)),
        (r"\boxed{Paris;}", [["Paris"], ["Rome"]], ";", _m(0.5, 0.5, 0.5, 0.5)),
        (r"\boxed{Paris}", [["Paris"]], ";", ALL),
        (r"\boxed{Paris}", ["Paris"], ";", ALL),
    ],
)
def test_score_multi(prediction: str, golds: list[list[str]], sep: str, expected: dict[str, float]) -> None:
    got = score_multi(prediction, golds, sep=sep)
    assert {k: got[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "span"),
    [
        (r"I think \boxed{Paris}, or London", "Paris"),  # the box wins
        ("Paris, the capital of France.", "Paris"),
        ("Berlin, London, Paris", "Berlin"),  # a list: only its first item
        ("Berlin; Paris", "Berlin"),
        ("Berlin and Paris", "Berlin"),
        ("Berlin\nParis", "Berlin"),
        ("[TARGET] stands for Paris.", "Paris"),  # the placeholder restated
        ("The [TARGET] is Paris", "Paris"),
        ("The answer is July 4, 1776.", "July 4, 1776"),  # a comma before a digit does not end the span
        ("about 1,000 men", "about 1,000 men"),
        ("one two three four five six seven eight nine ten", "one two three four five six seven eight"),
        ("", ""),
    ],
)
def test_extract_span(prediction: str, span: str) -> None:
    assert extract_span(prediction) == span


@pytest.mark.parametrize(
    "listing",
    ["Berlin, London, Paris, Rome", "Berlin; Paris; Rome", "Berlin and Paris", "Rome\nParis\nBerlin",
     "London, Paris", "The memory mentions Berlin, Paris and Rome."],
)
def test_span_metrics_do_not_pay_an_entity_list_that_contains_the_gold(listing: str) -> None:
    """sub-EM pays any list that names the gold somewhere; the answer-span metrics (the demo's reward and
    headline) do not."""
    scores = score(listing, "Paris")
    assert scores["sub_em"] == 1.0
    assert scores["span_em"] == 0.0 and scores["span_f1"] == 0.0


def test_span_metrics_pay_a_short_answer_and_give_partial_credit() -> None:
    assert score("Paris, the capital.", "Paris")["span_em"] == 1.0
    # content words: precision 2/2, recall 2/3 ("in" is not counted): F1 = 2 * 1 * (2/3) / (5/3) = 0.8
    assert score("Nobel Prize", "Nobel Prize in Literature")["span_f1"] == pytest.approx(0.8)
    assert score("Nobel Prize", "Nobel Prize in Literature")["span_em"] == 0.0


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [("This problem is a classic example of a logical fallacy", "Archduke of Austria"),  # shares only "of"
     ("The section is about the ancient religion", "About 1,500"),  # only "about"
     ("It is between the two", "between 66 to 70")],
)
def test_span_f1_gives_no_credit_for_shared_function_words(prediction: str, gold: str) -> None:
    """What a trained 135M model found under a word-level span F1: sentences sharing an "of" or "about" with
    the gold. Function words do not count."""
    assert score(prediction, gold)["span_f1"] == 0.0


def test_span_f1_keeps_credit_for_the_named_entity_and_golds_of_function_words() -> None:
    named = score("The section is about the Crab Nebula, a remnant", "Crab Nebula")
    assert named["span_f1"] == pytest.approx(0.8)  # content words "section crab nebula" vs "crab nebula"
    assert score(r"\boxed{The Who}", "The Who")["span_f1"] == 1.0  # a gold of function words only: all count


def test_answer_words_counts_the_whole_output() -> None:
    assert answer_words("Paris, the capital of France") == 5 and answer_words("  ") == 0


def test_contains_answer_applies_the_sub_em_test_to_any_text() -> None:
    memory = "Laplace built on the work of Isaac Newton; the Mécanique céleste (1799-1825)."
    assert contains_answer(memory, "isaac newton") and contains_answer(memory, ["Gauss", "Newton"])
    assert not contains_answer(memory, "Newton, Isaac")  # in order and contiguous, as sub-EM
    assert not contains_answer(memory, "Isaac Newtonian") and not contains_answer("", "Newton")
    assert contains_answer("the years 1799 - 1825", "1799-1825") is False  # punctuation deleted, not spaced
