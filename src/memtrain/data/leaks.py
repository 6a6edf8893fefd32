"""The leak check of masked texts, written independently of the masker (``memtrain.data.masking``).

A masked proxy document or IMR chunk must not show its answer in any form a reader would recognise. The
masker replaces forms it matches with regular expressions; if the check used the same expressions it could
never see what they miss. This module looks at the text another way - as a sequence of word tokens, accent-
and case-folded, punctuation dropped - and asks whether any *form* of the entity occurs as a run of them:

- the entity itself and the ``variants`` the caller masked (a PERSON's surname, contained NER spans),
- accent-folded (``Sao Paulo`` for ``São Paulo``) and punctuation-blind (``US``, ``U. S.`` for ``U.S.``;
  ``1000`` for ``1,000``), since tokens are compared folded and joined without separators,
- lower-case for a multi-word name (``supreme being`` for ``Supreme Being``); a one-word name only where the
  text's word has a capital (``May`` the month is not the verb "may"), an acronym (``US``, ``U.S.``) only in
  upper case (not "Us" at the start of a sentence),
- plural (``Kennedys`` for ``Kennedy``),
- initials of a multi-word name with at least two capitalised words (``U.S.``/``US`` for ``United States``).

Placeholders (``[MASK]``, ``[TARGET]``) are not text and are skipped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

_TOKEN = re.compile(r"\w+")
_PLACEHOLDER = re.compile(r"\[[A-Z]+\]")
_MAX_FORM_TOKENS = 12


def fold(text: str) -> str:
    """Case- and accent-folded: NFKD without combining marks, casefolded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _tokens(text: str) -> list[tuple[str, str]]:
    """(folded token, its case: "upper" for an acronym-like word of upper-case letters, "cap" for one with a
    capital, "lower") for each word of ``text``, placeholders skipped."""
    text = _PLACEHOLDER.sub(" ", text)
    return [(fold(m.group()), _case(m.group())) for m in _TOKEN.finditer(text)]


def _case(word: str) -> str:
    letters = [ch for ch in word if ch.isalpha()]
    if letters and all(ch.isupper() for ch in letters):
        return "upper"
    return "cap" if any(ch.isupper() for ch in letters) else "lower"


_RANK = {"lower": 0, "cap": 1, "upper": 2}


def initials(entity: str) -> str | None:
    """The initials of the capitalised words of a multi-word name (``United States of America`` -> ``usa``);
    None for fewer than two capitalised words."""
    caps = [w for w in entity.split() if w[:1].isupper()]
    return fold("".join(w[0] for w in caps)) if len(caps) >= 2 else None


def _needs(name: str, toks: list[tuple[str, str]]) -> str:
    """The case a match of ``name`` must show: an acronym ("US", "U.S.") only in upper case, another one-word
    name with a capital only capitalised, a multi-word name or one without capitals in any case."""
    letters = [ch for ch in name if ch.isalpha()]
    if len(letters) >= 2 and all(ch.isupper() for ch in letters):
        return "upper"
    if len(name.split()) == 1 and any(c != "lower" for _, c in toks):
        return "cap"
    return "lower"


def leak_forms(entity: str, variants: Sequence[str] = ()) -> dict[str, tuple[str, str]]:
    """Every form to look for, as its folded tokens joined without separators -> (the name it is a form of,
    the case a match must show: ``lower`` any, ``cap`` a capital, ``upper`` all upper-case)."""
    forms: dict[str, tuple[str, str]] = {}
    for name in (entity, *variants):
        toks = _tokens(name)
        if not toks:
            continue
        key = "".join(t for t, _ in toks)
        needs = _needs(name, toks)
        last = toks[-1][0]
        plurals = (key + "s", key + "es") if last.isalpha() and len(last) >= 3 else (
            (key + "s",) if last.isdigit() else ())
        for form in (key, *plurals):
            if form not in forms or _RANK[needs] < _RANK[forms[form][1]]:
                forms[form] = (name, needs)
    if (abbrev := initials(entity)) is not None:
        forms.setdefault(abbrev, (".".join(abbrev.upper()) + ".", "upper"))
    return forms


@lru_cache(maxsize=64)
def _ngrams(text: str) -> dict[str, int]:
    """Every run of 1.._MAX_FORM_TOKENS tokens of ``text`` joined -> the highest case rank of its occurrences
    (a run's case: ``upper`` if all its words are, else ``cap`` if any has a capital, else ``lower``)."""
    toks = _tokens(text)
    out: dict[str, int] = {}
    for i in range(len(toks)):
        joined, ranks = "", []
        for t, case in toks[i : i + _MAX_FORM_TOKENS]:
            joined += t
            ranks.append(_RANK[case])
            rank = 2 if min(ranks) == 2 else (1 if max(ranks) >= 1 else 0)
            out[joined] = max(out.get(joined, 0), rank)
    return out


def find_leaks(text: str, entity: str, variants: Sequence[str] = ()) -> list[str]:
    """The names (``entity``, a variant, or the dotted initials) some form of which (module docstring) still
    occurs in ``text``, each once; empty when the masking hid them all."""
    grams = _ngrams(text)
    found = [name for form, (name, needs) in leak_forms(entity, variants).items()
             if form in grams and grams[form] >= _RANK[needs]]
    return list(dict.fromkeys(found))
