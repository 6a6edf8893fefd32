"""A training task in one file, with its own config section (``task:``) and its own prompt kind: the model
is asked to say a word (``task.word``) and rewarded by the share of its answer's tokens that are multiples
of ``task.modulus`` (a reward a random-weight model's samples differ in). tests/test_plugins.py trains it."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from memtrain.agent.types import Turn
from memtrain.config import Config
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
from memtrain.prompts import register_prompt, render
from memtrain.rl.rollout import GroupKind, Rollout, SessionShape
from memtrain.rl.tasks.registry import register_task

SAY = GroupKind("say", primary=True)
register_prompt("say_word", "Say the word {word}, nothing else.", ("word",))


class SayWordSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field("alpha", min_length=1)
    modulus: int = Field(3, ge=2)


@register_task("say_word", settings=SayWordSettings)
class SayWordTask:
    required_fields = ("id",)

    def __init__(self, config: Config, tokenizer: Any) -> None:
        self.config, self.tokenizer, self.reward_metric = config, tokenizer, "say"

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        s = self.settings
        text, ids = render(self.tokenizer, "say_word", self.config.agent.templates, word=s.word)
        sp = replace(params, n=group_size, max_tokens=self.config.agent.answer_tokens)
        outputs = engine.generate([GenerationRequest(ids, sp, text) for _ in samples])
        out = []
        for sample, completions in zip(samples, outputs, strict=True):
            for c in completions:
                reward = sum(t % s.modulus == 0 for t in c.token_ids) / max(1, len(c.token_ids))
                turn = Turn("final", 0, ids, c.token_ids, c.logprobs, c.text, c.finish_reason == "length")
                out.append(Rollout(SAY.group_id(str(sample["id"])), reward, [turn], SAY,
                                   record={"sample_id": sample["id"], "prompt": text, "answer": c.text,
                                           "reward": reward}))
        return out, {}

    @classmethod
    def session_shape(cls, config: Config) -> SessionShape:
        return SessionShape(1, 64, config.agent.answer_tokens)

    @classmethod
    def check_budgets(cls, config: Config) -> None:
        """One short prompt: nothing to check."""
