"""Small real datasets and configs for the trainer tests (tiny model, tiny budgets, 1-4 steps)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from memtrain.config import Config, load_config
from memtrain.data.dataset import write_dataset
from memtrain.prompts import parse
from memtrain.rl.tasks.longqa import LongQATask

PROXY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("context", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        (
            "entity_spans",
            pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string())])),
        ),
    ]
)

ENTITIES = {
    "Paris": "GPE",
    "Berlin": "GPE",
    "Rome": "GPE",
    "Madrid": "GPE",
    "1889": "DATE",
    "1989": "DATE",
    "France": "GPE",
    "Germany": "GPE",
    "Italy": "GPE",
    "Spain": "GPE",
}

ARTICLES = [
    (
        "Paris is the capital of France. The Eiffel Tower was completed in 1889 in Paris. "
        "Berlin is the capital of Germany. Rome is in Italy.",
        "France",
    ),
    (
        "Berlin is the capital of Germany. The wall fell in 1989. Rome is in Italy. "
        "Paris is the capital of France and Berlin is large.",
        "Germany",
    ),
    (
        "Rome is in Italy. The Colosseum stands in Rome. Paris is the capital of France. "
        "Berlin is the capital of Germany.",
        "Italy",
    ),
    (
        "Madrid is the capital of Spain. Paris hosted a fair in 1889. Rome is in Italy and Madrid is large.",
        "Spain",
    ),
]


def entity_spans(context: str) -> list[dict[str, Any]]:
    return [
        {"start": m.start(), "end": m.end(), "label": label}
        for entity, label in ENTITIES.items()
        for m in re.finditer(rf"\b{re.escape(entity)}\b", context)
    ]


def proxy_rows(n: int = len(ARTICLES)) -> list[dict[str, Any]]:
    """Masked-entity rows like `memtrain data proxy` writes (the answer masked everywhere, entity spans)."""
    rows = []
    for i in range(n):
        text, answer = ARTICLES[i % len(ARTICLES)]
        context = re.sub(rf"\b{answer}\b", "[MASK]", text)
        rows.append(
            {
                "id": f"doc{i}",
                "context": context,
                "question": "Which entity does [MASK] stand for?",
                "answers": [answer],
                "entity_spans": entity_spans(context),
            }
        )
    return rows


def write_proxy_dataset(out: Path, n: int = len(ARTICLES)) -> Path:
    write_dataset(out, proxy_rows(n), PROXY_SCHEMA, task="proxy")
    return out


# Short prompts keep the tiny model's sequences short (the real templates are ~150 tokens of instructions).
SHORT_TEMPLATES = {
    "memory": "Q: {problem}\nMemory: {memory}\nText: {chunk}\nNew memory:",
    "final": "Q: {problem}\nMemory: {memory}\nAnswer in \\boxed{}:",
    "imr": "Q: {problem}\nMemory: {memory}\nText: {chunk}\nAnswer in \\boxed{}:",
    "initial_memory": "none",
    "imr_question": "Which entity is [TARGET]?",
}


def tiny_config(model_dir: Path, data_dir: Path, overrides: list[str] | None = None) -> Config:
    """A config that runs a step of the whole loop in about a second on the tiny model."""
    base = [
        f"model.name={model_dir}",
        f"data.path={data_dir}",
        "agent.chunk_tokens=24",
        "agent.memory_tokens=6",
        "agent.answer_tokens=4",
        "agent.max_chunks=2",
        "rl.group_size=2",
        "rl.imr_group_size=2",
        "rl.micro_batch_tokens=4096",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "train.batch_size=2",
        "train.steps=2",
        "train.checkpoint_every=1",
        "train.sample_every=1",
        "train.threads=2",
        "engine.batch_size=16",
    ]
    config = load_config(None, base + list(overrides or []))
    config.agent.templates = dict(SHORT_TEMPLATES)
    return config


def config_yaml(model_dir: Path, data_dir: Path, path: Path) -> Path:
    """The same settings as ``tiny_config`` as a YAML file (for CLI tests)."""
    path.write_text(
        f"""\
model: {{name: {model_dir}}}
data: {{path: {data_dir}}}
agent:
  chunk_tokens: 24
  memory_tokens: 6
  answer_tokens: 4
  max_chunks: 2
  templates: {json.dumps(SHORT_TEMPLATES)}
rl: {{group_size: 2, imr_group_size: 2, micro_batch_tokens: 4096}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
train: {{batch_size: 2, steps: 2, checkpoint_every: 1, sample_every: 1, threads: 2}}
engine: {{batch_size: 16}}
""",
        encoding="utf-8",
    )
    return path


def scripted_responder(prompt: str, sample: int) -> str:
    """Memory turns keep a note; sample 0 of every final/IMR request answers right, the others wrong.

    Answers: the final answer is France (right for ``scripted_rows()[0]``), the IMR answer is Paris (the only
    entity of that row, so the IMR label).
    """
    if "[TARGET]" in prompt:
        return "\\boxed{Paris}" if sample == 0 else "\\boxed{Rome}"
    if parse("memory", prompt) is not None:
        return "noted the city"
    return "\\boxed{France}" if sample == 0 else "\\boxed{Spain}"


def scripted_rows() -> list[dict[str, Any]]:
    """Row A: gold France, only entity Paris (one IMR prompt per trajectory). Row B: gold Germany, no
    entities (no IMR prompt possible)."""
    a = "The city of Paris is old. The [MASK] flag is blue. Paris has a river. The [MASK] coast is long."
    b = "The [MASK] forest is dark. Its rivers are long and its cities are old and large."
    spans_a = [{"start": m.start(), "end": m.end(), "label": "GPE"} for m in re.finditer("Paris", a)]
    return [
        {
            "id": "A",
            "context": a,
            "question": "Which entity does [MASK] stand for?",
            "answers": ["France"],
            "entity_spans": spans_a,
        },
        {
            "id": "B",
            "context": b,
            "question": "Which entity does [MASK] stand for?",
            "answers": ["Germany"],
            "entity_spans": [],
        },
    ]


def poison_updates(monkeypatch: Any, poisoned: Callable[[int], bool]) -> None:
    """Make the policy loss NaN in the optimizer updates whose 1-based count ``poisoned`` selects (the
    trainer then skips them), through ``monkeypatch`` (pytest's)."""
    from memtrain.rl import trainer as trainer_mod
    from memtrain.rl import update as update_mod

    calls = {"n": 0}
    real_loss, real_update = update_mod.grpo_loss, trainer_mod.policy_update

    def poisoned_loss(*args: Any, **kwargs: Any) -> Any:
        loss, stats = real_loss(*args, **kwargs)
        return (loss * math.nan if poisoned(calls["n"]) else loss), stats

    def counting_update(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real_update(*args, **kwargs)

    monkeypatch.setattr(update_mod, "grpo_loss", poisoned_loss)
    monkeypatch.setattr(trainer_mod, "policy_update", counting_update)


class ParityTask(LongQATask):
    """LongQA rollouts rewarded by the share of even token ids in the final answer: a reward that differs
    between the samples of a random-weight model, so every step has a real policy gradient."""

    def rollout(self, samples, engine, params, group_size, rng):  # type: ignore[no-untyped-def]
        rollouts, counters = super().rollout(samples, engine, params, group_size, rng)
        for r in rollouts:
            ids = r.turns[-1].completion_ids
            r.reward = sum(i % 2 == 0 for i in ids) / max(len(ids), 1)
        return rollouts, counters
