"""Answer scoring: the one place the project turns a model output and gold answers into numbers.

The GRPO reward and every evaluation call into this module, so a training curve and an eval table always
mean the same thing by "correct". Four metrics are reported for every prediction (``METRICS``):

* ``strict_em`` - the training reward: the content of the last ``\\boxed{...}`` must equal a gold answer after
  light math-style normalisation (``normalize_math``: case, spacing, ``$``/``%``, a leading article). No box
  means 0, so the policy is rewarded for committing to one final answer in the format the prompts ask for.
* ``em`` / ``f1`` - the usual SQuAD / HotpotQA metrics (``normalize_answer``) on the extracted answer (box,
  else an "answer is" / "Answer:" line, else the whole output), comparable with published numbers and
  forgiving about the output format.
* ``sub_em`` - the gold answer's normalised tokens appear, in order and contiguous, among the prediction's
  (gold-in-prediction, as the HotpotQA / MemAgent scripts): a longer answer that contains the gold counts, a
  prediction that is only a piece of the gold does not (``no`` is not ``Norway``, ``1`` is not ``1889``).
  Over a whole rambling answer it can be gamed: an answer that lists entities is paid if one of them is gold.
* ``span_em`` / ``span_f1`` - em / f1 of the *answer span* (``extract_span``): the box if there is one, else
  the first item of the answer line (cut at the first sentence end or list separator), at most
  ``SPAN_MAX_WORDS`` words. Only the first thing the model names counts, so listing entities does not pay;
  ``span_f1`` keeps partial credit for a partly right name, over content words only (function words such
  as "of", "about", "to" are not counted, or a sentence sharing an "of" with the gold would earn credit).
  The CPU demo trains and reports ``span_f1``.

Pure standard library, so scoring never depends on which engine or tokenizer produced the text.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

METRICS: tuple[str, ...] = ("strict_em", "em", "sub_em", "f1", "span_em", "span_f1")
REWARD_METRIC = "strict_em"
SPAN_MAX_WORDS = 8  # an answer span is capped here: entities have fewer than 8 words (the proxy filters)

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER_OPEN = re.compile(r"\\(?:text|textbf|mathrm)\s*\{")
_ANSWER_MARKER = re.compile(r"\banswer(?:\s+is\b\s*:?|\s*:)", re.IGNORECASE)
_MATH_DROP = re.compile(r"\\?[$%]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_LEADING_ARTICLE = re.compile(r"^\s*(?:a|an|the)\s+", re.IGNORECASE)
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_YES_NO = frozenset({"yes", "no", "noanswer"})
# Function words that ``span_f1`` does not count: "This problem is a classic example of ..." must not earn
# credit against "Archduke of Austria" for the "of" they share (a trained 135M model found that).
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "of", "in", "on", "at", "to", "for", "by", "with", "from", "as", "into", "about",
    "over", "under", "between", "and", "or", "but", "nor", "is", "are", "was", "were", "be", "been",
    "being", "this", "that", "these", "those", "it", "its", "his", "her", "their", "he", "she", "they",
    "we", "you", "i", "which", "who", "whom", "whose", "than", "then", "there", "here", "so", "such", "not",
})
# where the first item of an answer line ends: a sentence end, a list separator, a line break. A comma only
# separates when followed by a space and not by a digit ("July 4, 1776" and "1,000" stay whole).
_SPAN_END = re.compile(r"[.!?](?:\s|$)|;|:\s|,\s+(?!\d)|\s(?:and|or)\s|\n|\s[-–—]\s|\(")
# "[TARGET] stands for Paris" / "The [MASK] is Paris": the placeholder restated before the answer
_PLACEHOLDER_LEAD = re.compile(r"^(?:the\s+)?(?:entity\s+)?\[[A-Z]+\]\s*(?:stands for|refers to|represents|"
                               r"is|=)?\s*:?\s*", re.IGNORECASE)


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing a group whose content starts at ``start``; None if it never closes.

    Backslash escapes (``\\{``, ``\\}``, ``\\\\``) are skipped so that literal braces do not count.
    """
    depth = 1
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, stripped; None if absent or broken.

    "Last" is by start position (as in the MATH reference grader), so the final answer wins over earlier
    drafts and ``\\boxed{\\boxed{5}}`` gives ``5``. Nested braces are matched; if the last box never closes
    (typically a generation cut off by the token limit) the answer is None rather than a guessed prefix.
    """
    matches = list(_BOX_OPEN.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    close = _closing_brace(text, last.end())
    if close is None:
        return None
    return text[last.end() : close].strip()


def extract_answer(prediction: str) -> str:
    """The answer that em/sub_em/f1 grade: boxed content, else the last answer line, else the whole output.

    The fallback takes the rest of the line after the last "answer is" / "Answer:" (case-insensitive),
    without a trailing period, so chatty outputs without a box still get a fair em/sub_em/f1.
    ``\\text{...}``-style wrappers are removed so that ``\\boxed{\\text{Paris}}`` is graded as "Paris".
    """
    answer = extract_boxed(prediction)
    if answer is None:
        markers = list(_ANSWER_MARKER.finditer(prediction))
        if markers:
            line = prediction[markers[-1].end() :].partition("\n")[0]
            answer = line.strip().rstrip(".").rstrip()
        else:
            answer = prediction.strip()
    return _unwrap_text_commands(answer)


def extract_span(prediction: str, max_words: int = SPAN_MAX_WORDS) -> str:
    """The answer span that ``span_em`` / ``span_f1`` grade: the content of the last box if there is one,
    else the first item of the answer (``extract_answer`` without a box: the "answer is" line or the whole
    output, a restated ``[TARGET] is`` dropped, cut at the first sentence end, list separator or line
    break), at most ``max_words`` words. "Berlin, London, Paris" gives "Berlin"."""
    boxed = extract_boxed(prediction)
    if boxed is not None:
        span = _unwrap_text_commands(boxed)
    else:
        span = _PLACEHOLDER_LEAD.sub("", extract_answer(prediction).strip(), count=1)
        if (end := _SPAN_END.search(span)) is not None:
            span = span[: end.start()]
    return " ".join(span.split()[:max_words]).strip()


def answer_words(prediction: str) -> int:
    """Words of the whole output: reported next to every metric, so a metric bought with length shows."""
    return len(prediction.split())


def _unwrap_text_commands(s: str) -> str:
    """Replace ``\\text{x}``, ``\\textbf{x}`` and ``\\mathrm{x}`` by ``x`` (nested ones too)."""
    pos = 0
    while (m := _TEXT_WRAPPER_OPEN.search(s, pos)) is not None:
        close = _closing_brace(s, m.end())
        if close is None:
            pos = m.end()
            continue
        s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
        pos = m.start()
    return s


def normalize_math(s: str) -> str:
    """Math-style normalisation for ``strict_em``: formatting must not decide the reward, content must.

    Lower-cases, unwraps ``\\text`` / ``\\textbf`` / ``\\mathrm``, drops one leading article (``the``,
    ``a``, ``an`` followed by a space: NER spans keep determiners - "the United States" - and the reward must
    not depend on guessing them), drops ``$`` and ``%`` (escaped or not), all whitespace and one trailing
    period. Deliberately nothing more (no comma, unit or unicode handling), so the reward stays an exact,
    hard-to-game match.
    """
    s = _LEADING_ARTICLE.sub("", _unwrap_text_commands(s.lower()))
    s = _MATH_DROP.sub("", s)
    s = "".join(s.split())
    return s.removesuffix(".")


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD / HotpotQA answer normalisation, so em/sub_em/f1 match the official scripts.

    Steps: unicode NFKC (full-width and compatibility forms become plain characters), lower-case, delete
    punctuation (ASCII plus every unicode punctuation character), drop the articles a/an/the as whole words,
    collapse white space. Punctuation is deleted, not replaced by a space (as in the official scripts), which
    also removes thousands separators between digits: "1,000" and "1000" both become "1000". Accents are
    kept: "Zürich" and "Zurich" differ.
    """
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(ch for ch in s if not _is_punctuation(ch))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(pred_norm: str, gold_norm: str) -> float:
    """Token-level F1 as in the HotpotQA official script (yes / no / noanswer must match exactly)."""
    if (pred_norm in _YES_NO or gold_norm in _YES_NO) and pred_norm != gold_norm:
        return 0.0
    pred_tokens = pred_norm.split()
    gold_tokens = gold_norm.split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _content(norm: str) -> str:
    """A normalised answer without its function words (``_FUNCTION_WORDS``): what ``span_f1`` compares."""
    return " ".join(w for w in norm.split() if w not in _FUNCTION_WORDS)


def _contains_tokens(pred_norm: str, gold_norm: str) -> bool:
    """Whether the gold's tokens occur contiguously, in order, among the prediction's (both normalised)."""
    pred, gold = pred_norm.split(), gold_norm.split()
    if not gold:
        return False
    return any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1))


def _gold_list(gold: str | Sequence[str]) -> list[str]:
    """One gold string or several; an empty list is a data bug that would silently score 0, so it raises."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("gold answers must be a string or a non-empty list of strings, got an empty list")
    return golds


def _score_answer(answer: str, span: str, golds: list[str], has_box: bool) -> dict[str, float]:
    """All metrics for one extracted answer and its answer span, each the max over ``golds``."""
    pred_math = normalize_math(answer)
    pred_norm = normalize_answer(answer)
    span_norm = normalize_answer(span)
    result = dict.fromkeys(METRICS, 0.0)
    span_content = _content(span_norm)
    for gold in golds:
        gold_norm = normalize_answer(gold)
        gold_content = _content(gold_norm)
        metrics = {
            "strict_em": float(has_box and pred_math == normalize_math(gold)),
            "em": float(pred_norm == gold_norm),
            "sub_em": float(_contains_tokens(pred_norm, gold_norm)),
            "f1": _f1(pred_norm, gold_norm),
            "span_em": float(bool(span_norm) and span_norm == gold_norm),
            # content words only; a gold of function words alone ("The Who") keeps them
            "span_f1": _f1(span_content, gold_content) if gold_content else _f1(span_norm, gold_norm),
        }
        for name, value in metrics.items():
            result[name] = max(result[name], value)
    return result


def contains_answer(text: str, gold: str | Sequence[str]) -> bool:
    """Whether a gold answer occurs in ``text`` as sub-EM tests it (normalised tokens, contiguous, in order),
    applied to any text: e.g. whether a memory still holds the fact a question asks for."""
    return any(_contains_tokens(normalize_answer(text), normalize_answer(g)) for g in _gold_list(gold))


def score(prediction: str, gold: str | Sequence[str]) -> dict[str, float]:
    """Score a whole model output against one gold answer or a list of them (max over golds per metric).

    ``strict_em`` (the reward) looks only at the last box; ``em``/``sub_em``/``f1`` grade ``extract_answer``.
    Raises ValueError for an empty gold list.
    """
    golds = _gold_list(gold)
    return _score_answer(extract_answer(prediction), extract_span(prediction), golds,
                         extract_boxed(prediction) is not None)


def score_multi(prediction: str, golds: Sequence[str | Sequence[str]], sep: str = ";") -> dict[str, float]:
    """Score a multi-objective task (several questions, one output): mean over objectives of each metric.

    The answer (as in ``extract_answer``) is split on ``sep`` and matched positionally: part i answers
    objective i, parts are never re-ordered, extra parts are ignored and a missing part scores 0 on every
    metric. ``strict_em`` of a part counts only when the output contains a box at all.
    Raises ValueError when there are no objectives or an objective has no gold answer, and TypeError for a
    bare string (which would otherwise be read as one objective per character).
    """
    if isinstance(golds, str):
        raise TypeError("score_multi expects one list of gold answers per objective, not a string")
    if not golds:
        raise ValueError("score_multi needs at least one objective, got an empty gold list")
    objective_golds = [_gold_list(g) for g in golds]
    has_box = extract_boxed(prediction) is not None
    parts = [part.strip() for part in extract_answer(prediction).split(sep)]
    totals = dict.fromkeys(METRICS, 0.0)
    for part, part_golds in zip(parts, objective_golds, strict=False):
        span = " ".join(part.split()[:SPAN_MAX_WORDS])
        for name, value in _score_answer(part, span, part_golds, has_box).items():
            totals[name] += value
    return {name: total / len(objective_golds) for name, total in totals.items()}
