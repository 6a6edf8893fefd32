r"""The masking rule shared by E2E and IMR: where an entity and its variants occur in a text, and the text
with them masked.

Masking rule (used for [MASK] in proxy documents and [TARGET] in intermediate-recall chunks). It must hide the
entity, and only the entity: an unmasked variant gives the answer away, a masked common word turns the task
into local fill-in-the-blank.

- **Which entities**: candidates are cleaned NER spans: trimmed, a trailing possessive ``'s`` dropped, and a
  leading determiner dropped (spaCy keeps it inside spans - "the United States" - and the answer must not
  depend on it; the scorer ignores a leading article too). An entity written entirely in lower-case letters
  ("one", "first", "summer") is a common word, not a name, and is never a candidate.
- **Where it matches**: wherever its words occur with word boundaries on both sides (``(?<!\w)``/``(?!\w)``,
  so ``U.S.`` or ``$5`` work); any run of whitespace matches the spaces between its words and ``'`` matches
  ``’``; possessives keep their suffix (``Paris's`` -> ``[MASK]'s``); a plural is masked whole
  (``Kennedys``, ``1990s``); accents do not matter (``Sao Paulo`` for ``São Paulo``); inflections that form
  another word (``Parisian``) are not matched. Case: a one-word entity with a capital letter matches any
  capitalisation that has one (``Paris``, ``PARIS``) but never an all-lower-case word (``May`` does not hit
  the verb "may"); an acronym only in upper case (``US`` is not "us" nor "Us"); a multi-word name matches
  in any case (``supreme being``); an entity without capitals (``1889``, ``19th century``) ignores case.
- **Variants** (:func:`variant_forms`) are masked too, with the same token, and counted: punctuation variants
  (``U.S.`` -> ``U.S``, ``US``; ``1,000`` -> ``1000``: the entity's words with at most a few non-word
  characters between them), the dotted initials of a multi-word name (``United States`` -> ``U.S.``, and so
  ``US``), a PERSON's surname (``Barack Obama`` -> ``Obama``), and every other NER span of the text that is
  contained in the entity (``May 2009`` -> ``2009``). A span that contains the entity is masked inside
  (``Barack [MASK]``).
- **Leak check** (:func:`memtrain.data.leaks.find_leaks`): after masking, no form may survive. It is
  written independently of the masker (folded word tokens, not these regexes), so it sees what they miss;
  the proxy builder re-checks every whole document (headers included) and tries another entity if a form
  survives, so the datasets' leak rate is 0 by construction and measured on every row.
- **Broken spans** (:func:`repair_span`, :func:`span_problem`): NER spans cut in the wrong place are repaired
  at their edges (a trailing "for his" / "or", unpaired quotes, a trailing unclosed bracket) or rejected
  (malformed numbers, fragments of one or two characters), counted by reason.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from memtrain.data.leaks import find_leaks
from memtrain.prompts import MASK_TOKEN

Span = tuple[int, int, str]  # start char, end char, label
DEFAULT_MAX_MASKS = 10  # most [MASK]/[TARGET] replacements (variants included) a candidate may need per text
_POSSESSIVE = re.compile(r"\s*['’]s$")
_APOSTROPHE = re.compile(r"['’]")
_DETERMINER = re.compile(r"^(?:the|a|an)\s+(?=\S)", re.IGNORECASE)
_WORD = re.compile(r"\w+")
_NAME_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv"})
_LOOSE_GAP = r"\W{0,3}"  # between an entity's words in a punctuation variant ("U.S" for "U.S.")


def _has_upper(text: str) -> bool:
    return any(ch.isupper() for ch in text)


def _plural(word: str) -> str:
    """The optional plural suffix a form's last word may carry ("Kennedys", "1990s")."""
    if word.isdigit():
        return "s?"
    return "(?:e?s)?" if word.isalpha() and len(word) >= 3 else ""


@lru_cache(maxsize=65536)
def entity_pattern(entity: str) -> re.Pattern[str]:
    """The exact-form regex of the masking rule (see the module docstring) for ``entity``, matched against
    accent-folded text (:func:`fold_accents`), before the case rule (:func:`entity_matches` applies it)."""
    words = fold_accents(entity).split()
    if not words:
        raise ValueError("entity_pattern: empty entity")
    body = _APOSTROPHE.sub("['’]", r"\s+".join(re.escape(w) for w in words))
    return re.compile(rf"(?<!\w){body}{_plural(words[-1])}(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=65536)
def loose_pattern(entity: str) -> re.Pattern[str] | None:
    """The punctuation-blind regex of ``entity``: its words (``\\w+`` runs) in order with at most a few
    non-word characters between them (``U.S.`` matches ``U.S``, ``US`` and ``U. S.``; ``1,000`` matches
    ``1000``), accent-folded, plural allowed. None for an entity without a word character."""
    words = _WORD.findall(fold_accents(entity))
    if not words:
        return None
    body = _LOOSE_GAP.join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}{_plural(words[-1])}(?!\w)", re.IGNORECASE)


def _accent_table() -> dict[int, str]:
    """Latin letters with diacritics -> their base letter, one character for one (offsets are kept)."""
    table = {}
    for code in range(0xC0, 0x250):
        base = unicodedata.normalize("NFKD", chr(code))
        if len(base) > 1 and base[0].isascii() and all(unicodedata.combining(c) for c in base[1:]):
            table[code] = base[0]
    return table


_ACCENTS = _accent_table()


def fold_accents(text: str) -> str:
    """``text`` with accented Latin letters replaced by their base letter ("São" -> "Sao"); same length, so
    a match in the folded text has the same offsets in ``text``."""
    return text.translate(_ACCENTS)


def _is_acronym(text: str) -> bool:
    """Letters all upper-case, at least two of them ("US", "U.S.", "NASA")."""
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 2 and all(ch.isupper() for ch in letters)


def _case_ok(entity: str, matched: str) -> bool:
    """The case rule: an acronym matches only in upper case ("U.S." and "US", never "Us" or "us"); another
    capitalised one-word entity never matches an all-lower-case word ("May" vs "may"); a multi-word name
    matches in any case ("supreme being" for "Supreme Being")."""
    if _is_acronym(entity):
        return _is_acronym(matched)
    return not _has_upper(entity) or len(entity.split()) > 1 or _has_upper(matched)


def entity_matches(text: str, entity: str, loose: bool = False) -> list[tuple[int, int]]:
    """(start, end) of every match of ``entity`` in ``text`` under the masking rule (exact form, accents
    and a plural suffix allowed), or under the punctuation-blind pattern with ``loose``."""
    pattern = loose_pattern(entity) if loose else entity_pattern(entity)
    if pattern is None:
        return []
    folded = fold_accents(text)
    return [m.span() for m in pattern.finditer(folded) if _case_ok(entity, text[m.start() : m.end()])]


def count_matches(text: str, entity: str) -> int:
    return len(entity_matches(text, entity))


@dataclass(frozen=True)
class Masked:
    """A text with an entity and its variants replaced by a token."""

    text: str
    replaced: list[tuple[int, int]]  # replaced ranges in the ORIGINAL text's coordinates, in order
    variants: int  # how many of them are not the exact form of the entity

    @property
    def count(self) -> int:
        return len(self.replaced)


def mask_forms(text: str, entity: str, token: str, variants: Sequence[str] = (),
               loose: bool = True) -> Masked:
    """Replace every match of ``entity`` and of each variant form by ``token``, in one pass.

    Exact matches of the entity come first, then (``loose``) its punctuation-blind matches, then the variants
    longest first (each exact, then punctuation-blind); a range overlapping one already taken is skipped, so
    ``Barack Obama`` is masked whole before ``Obama`` is looked for.
    """
    taken: list[tuple[int, int, bool]] = []  # (start, end, is a variant)
    folded = fold_accents(text).casefold()

    def take(form: str, as_loose: bool, variant: bool) -> None:
        if not _may_occur(form, folded):
            return
        for a, b in entity_matches(text, form, as_loose):
            if all(b <= s or a >= e for s, e, _ in taken):
                taken.append((a, b, variant))

    take(entity, False, False)
    if loose:
        take(entity, True, True)
    for form in sorted(set(variants) - {entity}, key=lambda f: (-len(f), f)):
        take(form, False, True)
        if loose:
            take(form, True, True)
    taken.sort()
    pieces: list[str] = []
    last = 0
    for a, b, _ in taken:
        pieces += [text[last:a], token]
        last = b
    pieces.append(text[last:])
    return Masked("".join(pieces), [(a, b) for a, b, _ in taken], sum(v for _, _, v in taken))


def _may_occur(form: str, folded_text: str) -> bool:
    """Cheap necessary condition for a match of ``form``: its first word occurs in the casefolded text."""
    words = _WORD.findall(form)
    return not words or fold_accents(words[0]).casefold() in folded_text


def _spaced(text: str) -> str:
    return " ".join(text.replace("’", "'").casefold().split())


def mask_entity(text: str, entity: str, token: str) -> tuple[str, list[tuple[int, int]]]:
    """Replace every exact-form match of ``entity`` in ``text`` by ``token``; also return the replaced
    (start, end) spans in the coordinates of the original ``text`` (used to move other entities' spans)."""
    masked = mask_forms(text, entity, token, loose=False)
    return masked.text, masked.replaced


def surname(entity: str) -> str | None:
    """The last name of a multi-word person name (``Jr.``-style suffixes skipped); None otherwise."""
    words = entity.split()
    while len(words) > 1 and words[-1].strip(".,").lower() in _NAME_SUFFIXES:
        words.pop()
    if len(words) < 2:
        return None
    last = words[-1].strip(",")
    return last if len(last) > 1 and _has_upper(last) else None


def variant_forms(entity: str, label: str, others: Iterable[str] = ()) -> list[str]:
    """Other forms that would give ``entity`` away if left in the text: a PERSON's surname and every other
    entity text of ``others`` (the NER spans of the same text) contained in it. Punctuation variants need no
    listing: :func:`mask_forms` and :func:`find_leaks` match every form punctuation-blind."""
    forms: set[str] = set()
    if label == "PERSON" and (last := surname(entity)) is not None:
        forms.add(last)
    caps = [w for w in entity.split() if w[:1].isupper()]
    if len(caps) >= 2:  # dotted initials ("U.S." for "United States"; loose matching also finds "US")
        forms.add("".join(f"{w[0]}." for w in caps))
    key = _spaced(entity)
    for other in others:
        other = strip_determiner(other)
        spaced = _spaced(other)
        if spaced == key or spaced not in key:  # cheap test first: most spans are unrelated
            continue
        if is_usable(other, label, max_words=len(entity.split()) + 1) and entity_matches(entity, other):
            forms.add(other)
    return sorted(forms)


def shift_spans(
    spans: Iterable[Span], replaced: Sequence[tuple[int, int]], token_len: int, offset: int = 0
) -> list[Span]:
    """Map entity spans of a text through ``mask_entity``'s replacements (plus ``offset``); spans that overlap
    a replaced range are dropped."""
    out: list[Span] = []
    for s, e, label in spans:
        delta = 0
        clash = False
        for a, b in replaced:
            if b <= s:
                delta += token_len - (b - a)
            elif a < e:
                clash = True
                break
            else:
                break
        if not clash:
            out.append((s + delta + offset, e + delta + offset, label))
    return out


# ------------------------------------------------------------------------------------------ target spans


def clean_entity(text: str) -> str:
    """Entity text as NER gives it, trimmed and without a trailing possessive ``'s``."""
    return _POSSESSIVE.sub("", text.strip())


def strip_determiner(entity: str) -> str:
    """``entity`` without one leading ``the``/``a``/``an`` ("the United States" -> "United States")."""
    return _DETERMINER.sub("", entity, count=1)


# Broken NER spans (``span_problem``, ``repair_span``): what a span may not end with, and what makes it
# unusable. NER cuts spans in the wrong place on ~5% of the embedded corpus's candidates ("Nobel Prize in
# Literature for his", "3500kg and", "\"Southeast Asian", "Heliocentric (Sun", "1,01.325 millibars", "N").
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "and", "or", "nor", "but", "for", "of", "in", "on", "at", "to", "by", "with", "from",
    "as", "into", "than", "that", "which", "who", "whom", "whose", "his", "her", "its", "their", "our", "my",
    "your", "was", "were", "is", "are", "be", "been",
})
_EDGE_PUNCT = "\"'“”‘’«»,;:!?-–—/&*+=<>|"
_PAIRS = (("(", ")"), ("{", "}"), ("“", "”"))
_BAD_NUMBER = re.compile(r"\d,(?=\d)(?!\d{3}(?!\d))")  # a thousands comma not followed by exactly 3 digits
_ABBREVIATION_END = re.compile(r"(?:^|[\s.])\w{1,3}\.$")  # "U.S.", "Jr.", "St.": a period that belongs
_TRAILING_FUNCTION = re.compile(r"(?:\s+(?:" + "|".join(sorted(_FUNCTION_WORDS)) + r"))+$", re.IGNORECASE)
_ACRONYM = re.compile(r"[A-Z0-9]{2}")


def repair_span(entity: str) -> str:
    """``entity`` with what NER wrongly kept at its edges removed: trailing function words ("for his",
    "or"; a leading one, as in "at least the 17th century", is rejected instead), leading/trailing
    punctuation and unpaired quotes, and a trailing unclosed bracket with what follows it ("Heliocentric
    (Sun" -> "Heliocentric"). A trailing period stays only after an initial or abbreviation ("U.S.").
    Only the edges are cut, so the result is a substring of ``entity`` (its offset:
    ``entity.index(result)``); the caller checks it with ``span_problem``."""
    prev = None
    text = entity.strip()
    while text != prev:
        prev = text
        for open_, close in _PAIRS:
            if text.count(open_) > text.count(close):
                text = text[: text.rindex(open_)]
            if text.count(close) > text.count(open_) and text.startswith(close):
                text = text[1:]
        if text.count('"') % 2:
            text = text[1:] if text.startswith('"') else text[: text.rindex('"')]
        text = text.strip(_EDGE_PUNCT + " \t\n")
        if text.endswith(".") and not _ABBREVIATION_END.search(text):
            text = text[:-1]
        text = _TRAILING_FUNCTION.sub("", text)
    return text


def span_problem(entity: str) -> str | None:
    """Why ``entity`` is a broken span that no model could be rewarded for reconstructing, or None.

    Rules (the test suite's broken-span rule set): it ends in a function word or punctuation other than an
    abbreviation's period (``trailing_fragment``); starts with punctuation (``leading_punctuation``) or with
    a function word other than an article (``leading_fragment``);
    brackets or double quotes do not pair up (``unbalanced``); a thousands comma is not followed by exactly
    three digits (``malformed_number``); it is one character, or two that are not an upper-case acronym or a
    number (``fragment``).
    """
    words = entity.split()
    if not words:
        return "fragment"
    if words[-1].lower() in _FUNCTION_WORDS and len(words) > 1:
        return "trailing_fragment"
    if entity[-1] in _EDGE_PUNCT or (entity.endswith(".") and not _ABBREVIATION_END.search(entity)):
        return "trailing_fragment"
    if entity[0] in _EDGE_PUNCT or entity[0] in ")}”":
        return "leading_punctuation"
    if words[0].lower() in _FUNCTION_WORDS - {"a", "an", "the"} and len(words) > 1:
        return "leading_fragment"
    if any(entity.count(a) != entity.count(b) for a, b in _PAIRS) or entity.count('"') % 2:
        return "unbalanced"
    if _BAD_NUMBER.search(entity):
        return "malformed_number"
    core = "".join(ch for ch in entity if ch.isalnum())
    if len(core) < 2 or (len(core) == 2 and not _ACRONYM.fullmatch(core)):
        return "fragment"
    return None


def repaired_span(text: str, start: int, end: int) -> tuple[int, int] | str:
    """The span ``text[start:end]`` after :func:`repair_span`, as offsets into ``text``; or the
    :func:`span_problem` that no repair fixes."""
    raw = text[start:end]
    fixed = repair_span(raw)
    if not fixed:
        return "fragment"
    problem = span_problem(fixed)
    if problem is not None:
        return problem
    s = start + raw.index(fixed)
    return s, s + len(fixed)


_HEADER = re.compile(r"(?m)^Document (\d+):$")


def header_count(document: str) -> int:
    """The highest ``Document N:`` header number of a document (0: none): numbers no target may be."""
    return max((int(n) for n in _HEADER.findall(document)), default=0)


def names_a_header(entity: str, headers: int) -> bool:
    """Whether ``entity`` is a number 1..``headers``: masking it would also mask a ``Document N:`` header
    (``Document [TARGET]:`` between ``Document 1:`` and ``Document 3:`` gives it away)."""
    words = _WORD.findall(entity)
    return len(words) == 1 and words[0].isdigit() and 1 <= int(words[0]) <= headers


def is_usable(entity: str, label: str, max_words: int = 8, labels: Iterable[str] | None = None) -> bool:
    """The occurrence-independent filters: non-empty, has a letter or digit, not all lower-case letters (a
    common word), fewer than ``max_words`` words, no square brackets, label allowed."""
    if not entity or entity != entity.strip() or "[" in entity or "]" in entity:
        return False
    if not any(ch.isalnum() for ch in entity) or len(entity.split()) >= max_words:
        return False
    if not _has_upper(entity) and not any(ch.isdigit() for ch in entity):
        return False
    return labels is None or label in set(labels)


def normalize_spans(text: str, spans: Iterable[Span]) -> list[Span]:
    """Trim whitespace and trailing possessives from NER spans so each span's text is its clean entity
    (determiners stay: :func:`candidates` strips them, so cached spans keep what NER saw)."""
    out: list[Span] = []
    for s, e, label in spans:
        raw = text[s:e]
        ent = clean_entity(raw)
        if not ent:
            continue
        s2 = s + raw.index(ent)
        out.append((s2, s2 + len(ent), label))
    return out


def entity_span(text: str, span: Span) -> Span:
    """``span`` moved past a leading determiner of its text (the span of the entity a candidate answers)."""
    s, e, label = span
    stripped = strip_determiner(text[s:e])
    return (e - len(stripped), e, label)


# ------------------------------------------------------------------------------------------ documents


def span_texts(rows: list[int], texts: list[str], ents: dict[int, list[Span]]) -> set[str]:
    """The texts of every NER span of a document's passages (where a candidate's variants are looked up)."""
    return {texts[i][s:e] for i, row in enumerate(rows) for s, e, _ in ents[row]}


@dataclass(frozen=True)
class MaskedDocument:
    """A proxy document with its answer masked: the text, the usable entity spans left in it (IMR targets),
    how many masks it took and which variants of the answer were masked (and how often)."""

    text: str
    spans: list[dict[str, Any]]
    masks: int
    variants: list[str]
    variants_masked: int

    def astuple(self) -> tuple[str, list[dict[str, Any]], int, list[str], int]:
        return self.text, self.spans, self.masks, self.variants, self.variants_masked


def mask_document(passage_spans: Sequence[Sequence[Span]], texts: Sequence[str], answer: str, label: str,
                  others: set[str], max_masks: int = DEFAULT_MAX_MASKS, max_entity_words: int = 8,
                  entity_labels: Iterable[str] | None = None) -> MaskedDocument | str:
    """The document of ``texts`` (one passage each, under ``Document i:`` headers) with ``answer`` (NER label
    ``label``) masked everywhere, or why it cannot be the answer: it needs more than ``max_masks`` masks, or a
    form survives (e.g. in a header). The cheap checks come first: most candidates fail one.

    ``passage_spans``: each passage's NER spans; ``others``: the texts of all of them (:func:`span_texts`,
    computed once per document by the caller), where the answer's variants are looked up."""
    variants = variant_forms(answer, label, others)
    masked = [mask_forms(text, answer, MASK_TOKEN, variants) for text in texts]
    if sum(m.count for m in masked) > max_masks:
        return "too_many_masks"
    headers = [f"{chr(10) * 2 if i > 1 else ''}Document {i}:\n" for i in range(1, len(texts) + 1)]
    doc = "".join(h + m.text for h, m in zip(headers, masked, strict=True))
    if find_leaks(doc, answer, variants):
        return "variant_survives"
    # a span can only hold a form of the answer if it holds the form's first word
    first_words = {w.casefold() for form in (answer, *variants) for w in _WORD.findall(form)[:1]}
    spans: list[dict[str, Any]] = []
    pos = 0
    for ents, header, m in zip(passage_spans, headers, masked, strict=True):
        pos += len(header)
        for span in shift_spans(list(ents), m.replaced, len(MASK_TOKEN)):
            s, e, label = entity_span(m.text, span)
            fixed = repaired_span(m.text, s, e)
            if isinstance(fixed, str):
                continue  # a broken NER span: never an IMR target
            s, e = fixed
            ent = m.text[s:e]
            if not is_usable(ent, label, max_entity_words, entity_labels):
                continue
            if names_a_header(ent, len(texts)):
                continue
            folded = ent.casefold()
            if any(w in folded for w in first_words) and find_leaks(ent, answer, variants):
                continue
            spans.append({"start": s + pos, "end": e + pos, "label": label})
        pos += len(m.text)
    return MaskedDocument(doc, spans, sum(m.count for m in masked), variants, sum(m.variants for m in masked))
