"""Prompt templates: structure, one-pass filling, config overrides, chat rendering through real tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain import prompts
from memtrain.config import AgentConfig, ConfigError, load_config
from memtrain.models import load_tokenizer
from memtrain.prompts import (
    DEFAULT_TEMPLATES,
    INITIAL_MEMORY,
    MASK_TOKEN,
    PROXY_QUESTION,
    TARGET_TOKEN,
    fill,
    render,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def test_memory_prompt_has_problem_memory_chunk_in_order() -> None:
    text = fill("memory", problem="PROBLEM-X", memory="MEMORY-Y", chunk="CHUNK-Z")
    assert text.index("PROBLEM-X") < text.index("MEMORY-Y") < text.index("CHUNK-Z")
    assert "{" + "memory}" not in text and "{chunk}" not in text


def test_final_prompt_has_no_chunk_and_asks_for_a_box() -> None:
    text = fill("final", problem="PROBLEM-X", memory="MEMORY-Y")
    assert text.index("PROBLEM-X") < text.index("MEMORY-Y")
    assert "\\boxed{}" in text  # literal braces survive: no format-string escaping needed


def test_imr_prompt_and_proxy_texts_use_distinct_placeholders() -> None:
    text = fill("imr", problem=prompts.IMR_QUESTION, memory="M", chunk=f"the {TARGET_TOKEN} tower")
    assert TARGET_TOKEN in prompts.IMR_QUESTION and MASK_TOKEN not in prompts.IMR_QUESTION
    assert MASK_TOKEN in PROXY_QUESTION and TARGET_TOKEN not in PROXY_QUESTION
    assert text.index("M\n") < text.index(f"the {TARGET_TOKEN} tower") and "\\boxed{" in text


def test_field_values_are_not_expanded_again() -> None:
    """A document that contains '{memory}' or braces must appear verbatim (one-pass substitution)."""
    chunk = "code: {memory} and {problem} and {x} and \\boxed{3}"
    text = fill("memory", problem="P", memory="the memory", chunk=chunk)
    assert chunk in text
    assert text.count("the memory") == 1


def test_fill_rejects_wrong_fields() -> None:
    with pytest.raises(ValueError, match="missing"):
        fill("final", problem="P")
    with pytest.raises(ValueError, match="unexpected"):
        fill("final", problem="P", memory="M", chunk="C")
    with pytest.raises(ValueError, match="prompt kind"):
        fill("nope", problem="P")


def test_config_overrides_replace_templates_and_are_validated(tmp_path: Path) -> None:
    cfg = load_config(None, ["agent.templates.final=ANSWER {problem} USING {memory} IN A BOX",
                             "agent.templates.initial_memory=nothing yet"])
    assert fill("final", cfg.agent.templates, problem="P", memory="M") == "ANSWER P USING M IN A BOX"
    assert prompts.template("initial_memory", cfg.agent.templates) == "nothing yet"
    assert prompts.template("initial_memory", {}) == INITIAL_MEMORY
    with pytest.raises(ConfigError, match=r"missing placeholder\(s\) \{chunk\}"):
        load_config(None, ["agent.templates.memory=only {problem} and {memory}"])
    with pytest.raises(ConfigError, match="unknown template 'finall'"):
        load_config(None, ["agent.templates.finall=x {problem} {memory}"])
    with pytest.raises(ValueError, match="non-empty"):
        AgentConfig(templates={"initial_memory": "  "})


def test_every_default_template_passes_its_own_validation() -> None:
    prompts.validate_templates(DEFAULT_TEMPLATES)


def test_render_is_the_chat_template_tokenized_without_extra_specials(tok) -> None:
    text, ids = render(tok, "final", problem="Which city?", memory="Paris is in France.")
    content = fill("final", problem="Which city?", memory="Paris is in France.")
    expected = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.slow
def test_smollm2_render_has_a_single_leading_bos(smollm2_dir: str) -> None:
    tok = load_tokenizer(smollm2_dir)
    text, ids = render(tok, "memory", problem="Q?", memory=INITIAL_MEMORY, chunk="Some text.")
    reference = tok.apply_chat_template([{"role": "user", "content": fill(
        "memory", problem="Q?", memory=INITIAL_MEMORY, chunk="Some text.")}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(reference)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.decode(ids) == text


def test_parse_inverts_fill_for_every_kind_and_tells_kinds_apart() -> None:
    from memtrain.prompts import PLACEHOLDERS, PROMPT_KINDS, fill, parse

    for kind in PROMPT_KINDS:
        fields = {name: f"<{name} with {{braces}} and\nlines>" for name in PLACEHOLDERS[kind]}
        text = "<|im_start|>user\n" + fill(kind, **fields) + "<|im_end|>\n<|im_start|>assistant\n"
        assert parse(kind, text) == fields, kind
        others = [k for k in PROMPT_KINDS if k != kind and parse(k, text) is not None]
        assert others == [], (kind, others)
    custom = {"final": "ANSWER {problem} FROM {memory}"}
    assert parse("final", "ANSWER q FROM m", custom) == {"problem": "q", "memory": "m"}
    assert parse("final", "ANSWER q FROM m") is None
