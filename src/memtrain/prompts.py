"""Every prompt the agent sees, in one module used by training, evaluation and inference alike.

The wording is ours; the structure follows docs/method.md: memory-update steps see [instruction, problem,
previous memory, chunk], the final step sees [instruction, problem, memory] and answers in \\boxed{},
the intermediate-recall step sees [memory, chunk with [TARGET]].

Templates are plain text with ``{problem}``, ``{memory}`` and ``{chunk}`` placeholders. Only those exact
names are substituted, in one pass, so literal braces (``\\boxed{}``) need no escaping and a document that
happens to contain ``{memory}`` is never expanded. Every template can be replaced from the config
(``agent.templates.<name>``); :func:`validate_templates` checks names and required placeholders up front.

:func:`render` is the only way a prompt becomes token ids: the filled template is sent as one user turn
through the tokenizer's chat template (generation prompt appended) and tokenized without adding special
tokens again (the chat template already holds them), so training, ``memtrain eval`` and ``memtrain answer``
feed the model byte-identical prompts for the same state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from memtrain.errors import UserError

MASK_TOKEN = "[MASK]"
TARGET_TOKEN = "[TARGET]"

PROXY_QUESTION = (
    f"Every occurrence of one entity in the article has been replaced by the placeholder {MASK_TOKEN}. "
    f"Based on the whole article, which entity does {MASK_TOKEN} stand for?"
)

IMR_QUESTION = (
    f"Every occurrence of one entity in the section below has been replaced by the placeholder "
    f"{TARGET_TOKEN}. Using your memory of the earlier sections, which entity does {TARGET_TOKEN} stand for?"
)

INITIAL_MEMORY = "No previous memory: this is the first section of the document."

MEMORY_TEMPLATE = """You are reading a long document one section at a time in order to solve a problem. \
Earlier sections cannot be seen again: all you keep is a short memory, which you rewrite after every section.

Problem:
{problem}

Your memory so far:
{memory}

Next section of the document:
{chunk}

Write your new memory. Keep everything from the old memory that may help to solve the problem, add the \
relevant facts from this section and drop what is irrelevant. Reply with the new memory only."""

FINAL_TEMPLATE = """You have read a long document section by section and kept a memory of it. \
Solve the problem using your memory.

Problem:
{problem}

Your memory:
{memory}

Reason briefly if needed, then give the final answer inside \\boxed{}, for example \\boxed{Paris}."""

IMR_TEMPLATE = """You have been reading a long document section by section and kept a memory of what you read.

Problem:
{problem}

Your memory:
{memory}

Section:
{chunk}

Give the final answer inside \\boxed{}, for example \\boxed{Paris}."""

DEFAULT_TEMPLATES: dict[str, str] = {
    "memory": MEMORY_TEMPLATE,
    "final": FINAL_TEMPLATE,
    "imr": IMR_TEMPLATE,
    "initial_memory": INITIAL_MEMORY,
    "imr_question": IMR_QUESTION,
}

# The placeholders each template must contain (and the only ones that are substituted in it).
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "memory": ("problem", "memory", "chunk"),
    "final": ("problem", "memory"),
    "imr": ("problem", "memory", "chunk"),
    "initial_memory": (),
    "imr_question": (),
}

# The chat-rendered prompt kinds (the other templates are texts that go into their fields); extended by
# register_prompt, never reassigned, so every importer sees the registered kinds.
PROMPT_KINDS: list[str] = ["memory", "final", "imr"]


def register_prompt(name: str, text: str, placeholders: tuple[str, ...] = (), chat: bool = True) -> None:
    """Add template ``name`` (``chat``: a prompt kind rendered as a user turn by :func:`render`; else a
    text that goes into another prompt's field). Its ``placeholders`` (``{field}`` names, each in ``text``)
    are what :func:`fill` substitutes and :func:`parse` reads back; ``agent.templates.NAME`` overrides it
    like a built-in one. A task or evaluation module registers its own prompts when it is imported."""
    if name in DEFAULT_TEMPLATES:
        raise ValueError(f"prompt template {name!r} is already registered")
    bad = [f for f in placeholders if not f.isidentifier() or "{" + f + "}" not in text]
    if bad:
        raise ValueError(f"prompt template {name!r}: placeholder(s) {', '.join(bad)} are not {{name}} fields "
                         "of its text")
    DEFAULT_TEMPLATES[name] = text
    PLACEHOLDERS[name] = tuple(placeholders)
    if chat:
        PROMPT_KINDS.append(name)


def _placeholders(kind: str) -> re.Pattern[str]:
    """``{field}`` for the fields of ``kind`` only: other braces (``\\boxed{Paris}``) are literal text."""
    return re.compile(r"\{(" + "|".join(map(re.escape, PLACEHOLDERS[kind])) + r")\}")


def validate_templates(templates: Mapping[str, str]) -> None:
    """Fail on an unknown template name or a template missing one of its placeholders (a silent typo
    would otherwise train a model that never sees its memory)."""
    for name, text in templates.items():
        if name not in DEFAULT_TEMPLATES:
            raise UserError(f"agent.templates: unknown template {name!r}; expected one of "
                            f"{', '.join(DEFAULT_TEMPLATES)}")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"agent.templates.{name}: expected a non-empty string")
        missing = [p for p in PLACEHOLDERS[name] if "{" + p + "}" not in text]
        if missing:
            raise UserError(f"agent.templates.{name}: missing placeholder(s) "
                            f"{', '.join('{' + p + '}' for p in missing)}")


def template(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """The template ``name``: the config override when there is one, else ours."""
    if name not in DEFAULT_TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of {', '.join(DEFAULT_TEMPLATES)}")
    if overrides and name in overrides:
        return overrides[name]
    return DEFAULT_TEMPLATES[name]


def fill(kind: str, overrides: Mapping[str, str] | None = None, **fields: str) -> str:
    """The user-message text of prompt ``kind`` with its placeholders replaced (one pass, exact names)."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompt kind {kind!r}: expected one of {', '.join(PROMPT_KINDS)}")
    needed = PLACEHOLDERS[kind]
    missing = [p for p in needed if p not in fields]
    extra = [f for f in fields if f not in needed]
    if missing or extra:
        raise ValueError(f"prompt {kind!r} takes fields {', '.join(needed)}; missing {missing}, "
                         f"unexpected {extra}")
    text = template(kind, overrides)
    return _placeholders(kind).sub(lambda m: fields[m.group(1)], text) if needed else text


def parse(kind: str, text: str, overrides: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The field values of a ``kind`` prompt inside ``text`` (a filled template, chat-rendered or not), or
    None when ``text`` holds no such prompt: the inverse of :func:`fill`, so tools and tests read prompts
    through the templates instead of depending on their wording."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompt kind {kind!r}: expected one of {', '.join(PROMPT_KINDS)}")
    tpl = template(kind, overrides)
    parts = _placeholders(kind).split(tpl) if PLACEHOLDERS[kind] else [tpl]  # literal, name, ..., literal
    pattern = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern += re.escape(part)
        else:
            last = i == len(parts) - 2 and not parts[-1]
            pattern += f"(?P<{part}>.*)" if last else f"(?P<{part}>.*?)"
    m = re.search(pattern, text, re.DOTALL)
    return None if m is None else m.groupdict()


def chat_text(tokenizer: Any, content: str) -> str:
    """``content`` as one user turn through the tokenizer's chat template, with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an already chat-rendered prompt: no BOS added (the chat template holds its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer: Any, kind: str, overrides: Mapping[str, str] | None = None,
           **fields: str) -> tuple[str, list[int]]:
    """The exact (text, token ids) the engine gets for prompt ``kind`` (one of ``PROMPT_KINDS``)."""
    text = chat_text(tokenizer, fill(kind, overrides, **fields))
    return text, encode_prompt(tokenizer, text)


# ==========================================================================================================
# Downstream tasks (issue 6): search agent, full-context and closed-book baselines. Kept in this module so
# that training and evaluation render them through the same ``render`` and the same config overrides. The
# search prompts reuse the memory-agent placeholders: ``{chunk}`` holds the latest search results.
# ==========================================================================================================

SEARCH_INITIAL_MEMORY = "No memory yet: this is your first turn."
SEARCH_NO_RESULTS = "No search yet."

_SEARCH_INTRO = """You solve a problem by searching Wikipedia, one search per turn. Earlier turns cannot be \
seen again: all you keep is a short memory, which you rewrite at every turn.

Problem:
{problem}

Your memory so far:
{memory}

Results of your latest search:
{chunk}

"""

_BOXED_MULTI = ("When the problem has several questions, answer all of them in order in one box, separated "
                "by ';', for example \\boxed{Paris; 1889}.")

SEARCH_TEMPLATE = _SEARCH_INTRO + (
    "First write your new memory inside <memory>...</memory>: keep what may still help and add the relevant "
    "facts from the results. Then either search for missing information with <search>your query</search>, "
    "or, if you know the answer, give the final answer inside \\boxed{}. " + _BOXED_MULTI)

SEARCH_LAST_TEMPLATE = _SEARCH_INTRO + (
    "This is your last turn: you cannot search any more. First write your new memory inside "
    "<memory>...</memory>, then give your best final answer inside \\boxed{}. " + _BOXED_MULTI)

FULL_CONTEXT_TEMPLATE = """Read the document below and solve the problem.

Document:
{chunk}

Problem:
{problem}

Reason briefly if needed, then give the final answer inside \\boxed{}, for example \\boxed{Paris}."""

CLOSED_BOOK_TEMPLATE = """Answer the question from your own knowledge.

Problem:
{problem}

Give the final answer inside \\boxed{}, for example \\boxed{Paris}."""

register_prompt("search", SEARCH_TEMPLATE, ("problem", "memory", "chunk"))
register_prompt("search_last", SEARCH_LAST_TEMPLATE, ("problem", "memory", "chunk"))
register_prompt("search_initial_memory", SEARCH_INITIAL_MEMORY, chat=False)
register_prompt("search_no_results", SEARCH_NO_RESULTS, chat=False)
register_prompt("full_context", FULL_CONTEXT_TEMPLATE, ("problem", "chunk"))
register_prompt("closed_book", CLOSED_BOOK_TEMPLATE, ("problem",))
