"""A deterministic engine whose replies come from a function or a table: exact control-flow tests and demos.

It follows the same conventions as the hf engine, through a real tokenizer: the reply is tokenized, cut at
``max_tokens`` (``finish_reason='length'``, the text is the decoded cut) or else ended with the EOS token
(kept in ``token_ids``, not in ``text``); a stop string cuts the text (the ids keep the tokens up to the one
completing it). Log-probs are a fixed value per token (``logprob``), so tests can check that they travel
unchanged into trajectories. Every ``generate`` call is recorded in ``calls``, so a test can assert how
requests were batched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from memtrain.config import EngineConfig
from memtrain.engines.base import Completion, GenerationRequest
from memtrain.engines.checks import validate_requests
from memtrain.engines.registry import register_engine
from memtrain.errors import UserError

Responder = Callable[[str, int], str]


def table_responder(table: Mapping[str, str], default: str | None = None) -> Responder:
    """Reply with the value of the first key (in insertion order) that occurs in the prompt text.

    Without a match the ``default`` is used; without a default it is an error that shows the prompt's end,
    so a test that forgot a case fails loudly.
    """
    rules = list(table.items())

    def respond(prompt: str, sample: int) -> str:
        for key, reply in rules:
            if key in prompt:
                return reply
        if default is None:
            raise KeyError(f"scripted engine: no table entry matches the prompt ending {prompt[-200:]!r}")
        return default

    return respond


KindReply = str | Callable[[dict[str, str], int], str]


def kind_responder(replies: Mapping[str, KindReply], templates: Mapping[str, str] | None = None,
                   default: str | None = None) -> Responder:
    """Reply by prompt kind (``memory``, ``final``, ``imr``, ``search``, ...), recognised through the
    templates (:func:`memtrain.prompts.parse`, config ``templates`` overrides honoured), not their wording. A
    callable reply gets the prompt's fields (``problem``, ``memory``, ``chunk``) and the sample index."""
    from memtrain.prompts import parse

    def respond(prompt: str, sample: int) -> str:
        for kind, reply in replies.items():
            fields = parse(kind, prompt, templates)
            if fields is not None:
                return reply(fields, sample) if callable(reply) else reply
        if default is None:
            raise KeyError(f"scripted engine: the prompt ending {prompt[-200:]!r} is none of the kinds "
                           f"{', '.join(replies)}")
        return default

    return respond


class ScriptedEngine:
    """An :class:`~memtrain.engines.base.Engine` replying ``respond(prompt_text, sample_index)``.

    ``respond`` may also be a mapping (see :func:`table_responder`). ``prompt_text`` is the request's token
    ids decoded with special tokens, so it holds the full chat-rendered prompt.
    """

    def __init__(self, respond: Responder | Mapping[str, str], tokenizer: Any, logprob: float = -0.5) -> None:
        self.respond: Responder = table_responder(respond) if isinstance(respond, Mapping) else respond
        self.tokenizer = tokenizer
        self.logprob = logprob
        self.calls: list[list[GenerationRequest]] = []
        if tokenizer.eos_token_id is None:
            raise ValueError("ScriptedEngine: the tokenizer has no eos_token_id")

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        validate_requests(requests)
        self.calls.append(list(requests))
        out = []
        for r in requests:
            prompt = self.tokenizer.decode(r.prompt_ids, skip_special_tokens=False)
            out.append([self._complete(self.respond(prompt, j), r) for j in range(r.params.n)])
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _complete(self, reply: str, request: GenerationRequest) -> Completion:
        """Mimic sampling ``reply``: stop string, then token cap, then EOS (the hf engine's order)."""
        p = request.params
        ids = list(self.tokenizer(reply, add_special_tokens=False)["input_ids"])
        if p.stop and any(stop in reply for stop in p.stop):
            end = next((i for i in range(1, len(ids) + 1) if any(s in self._decode(ids[:i]) for s in p.stop)),
                       None)
            if end is not None and end <= p.max_tokens:
                text = self._decode(ids[:end])
                text = text[: min(text.find(s) for s in p.stop if s in text)]
                return Completion(ids[:end], text, [self.logprob] * end, "stop")
        if len(ids) >= p.max_tokens:  # the EOS would have been token max_tokens + 1
            ids = ids[: p.max_tokens]
            return Completion(ids, self._decode(ids), [self.logprob] * len(ids), "length")
        text = self._decode(ids)
        ids.append(int(self.tokenizer.eos_token_id))
        return Completion(ids, text, [self.logprob] * len(ids), "stop")


@register_engine("scripted")
def build_scripted_engine(cfg: EngineConfig, model_name: str, model: Any, tokenizer: Any) -> ScriptedEngine:
    """A config cannot say what to reply: name the kind so the error says where to build one instead."""
    raise UserError("engine.kind 'scripted': a scripted engine replays fixed outputs for tests and demos "
                    "and must be constructed in code (memtrain.engines.scripted), not from a config; use "
                    "engine.kind=hf, vllm or openai")
