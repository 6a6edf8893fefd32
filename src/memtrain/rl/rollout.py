"""The rollout data model of GRPO training (docs/method.md section 4): what a task returns, how its groups are
scored and filtered, and the training sequences one update consumes.

A :class:`Task` turns a batch of rows into :class:`Rollout` objects, one per GRPO group member; everything
after that is the same for every task: advantages within each group, the DAPO filter (:func:`score_groups`),
one :class:`TrainSequence` per turn with the rollout's advantage broadcast to all of its turns
(:func:`training_sequences`).

Groups have one definition, :class:`GroupKind`. A *primary* group stands for a row: its members are the row's
G rollouts (the G1 E2E trajectories, the G search episodes). A *secondary* group hangs off one member of a
primary group (IMR: the G2 answers to trajectory i's prompt), so its id names that member. Primary groups are
what ``train.batch_size`` counts when filtered batches are refilled, what ``samples.jsonl`` shows, and, in
the verl backend, what spans the sessions of a row (a secondary group stays inside its session).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from memtrain.agent.types import TURN_KINDS, Turn
from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.rl.core import group_advantages, uniform_groups_mask, writer_credit


@dataclass(frozen=True)
class GroupKind:
    """What a GRPO group stands for (see the module docstring); ``name`` prefixes its metrics
    (``<name>_reward``)."""

    name: str
    primary: bool

    def group_id(self, sample_id: str, member: int | None = None) -> str:
        """The group's id, unique within a step: ``{sample_id}/{name}`` for a primary group,
        ``{sample_id}/{member}/{name}`` for the secondary group of the row's ``member``-th rollout."""
        if self.primary != (member is None):
            raise ValueError(f"group kind {self.name!r}: a {'primary' if self.primary else 'secondary'} "
                             f"group {'takes no' if self.primary else 'needs a'} member index (got {member})")
        return f"{sample_id}/{self.name}" if member is None else f"{sample_id}/{member}/{self.name}"


E2E = GroupKind("e2e", primary=True)  # the G1 memory-agent trajectories of a row
IMR = GroupKind("imr", primary=False)  # the G2 answers to one trajectory's intermediate-memory-recall prompt
SEARCH = GroupKind("search", primary=True)  # the G search episodes of a row


@dataclass
class Rollout:
    """One GRPO group member.

    ``group``: its advantage group (``kind.group_id(...)``). ``turns``: every model call of the member (all
    memory turns + the final turn, one IMR turn, the turns of a search episode); each becomes a training
    sequence with the rollout's advantage. ``metrics``: per-rollout numbers the trainer averages over the
    step's rollouts that have them. ``record``: a readable summary for ``samples.jsonl``.
    """

    group: str
    reward: float
    turns: list[Turn]
    kind: GroupKind
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    # ``rl.imr_credit=writer``: the reward as (match, [(bonus of an IMR prompt, how many leading turns wrote
    # the memory it asked), ...]); each bonus credits only its writers (memtrain.rl.core.writer_credit). None:
    # the rollout's advantage is broadcast to every turn (the paper).
    credit: tuple[float, list[tuple[float, int]]] | None = None

    @property
    def primary(self) -> bool:
        """Whether its group stands for a row (see :class:`GroupKind`)."""
        return self.kind.primary


@dataclass(frozen=True)
class SessionShape:
    """The most one session (one group member of a row with everything hanging off it) asks of the model,
    which backends that pre-allocate per session (verl) size their batches by."""

    calls: int  # model calls, i.e. training sequences
    prompt_tokens: int  # the longest prompt
    response_tokens: int  # the longest completion


class Task(Protocol):
    """What a training task provides; a module of ``memtrain.rl.tasks`` registers one with
    ``@register_task("name")`` (``memtrain.rl.tasks.registry``), and ``train.task: name`` selects it."""

    name: ClassVar[str]  # set by register_task
    required_fields: ClassVar[tuple[str, ...]]  # row keys it reads; checked on every row before training
    reward_metric: str  # the answer metric its rewards use (``rl.reward_metric`` or the task's default)

    def __init__(self, config: Config, tokenizer: Any) -> None: ...

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        """Sample ``group_size`` members per row and reward them. Returns the rollouts and step counters
        (summed over the step's rollout rounds, e.g. ``imr_none``)."""
        ...

    @classmethod
    def session_shape(cls, config: Config) -> SessionShape:
        """What one session of this task asks of the model under ``config`` (a one-line error when that is
        unbounded)."""
        ...

    @classmethod
    def check_budgets(cls, config: Config) -> None:
        """Fail in one line, before anything loads, when ``config``'s budgets cannot fit the model."""
        ...


@dataclass
class TrainSequence:
    """One prompt -> completion model call to train on.

    ``old_logprobs``: per completion token, the log-probs the tokens were sampled with
    (``Completion.logprobs`` from the engine), or None. ``kind``: 'memory' (an E2E step that rewrites the
    memory), 'final' (the answer step), 'imr' or 'search' (a search-agent turn: memory + query or answer).
    ``group``: its advantage group (for logging/filtering). ``session``: the rollout it belongs to (an E2E
    trajectory's memory and final turns share one; an IMR sample or search episode is one), used by
    ``rl.loss_agg=session_mean`` to give every rollout the same total weight; None: a session of its own.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logprobs: list[float] | None = None
    kind: str = "final"
    group: str = ""
    session: str | None = None

    def __post_init__(self) -> None:
        where = f"TrainSequence(group={self.group!r}, kind={self.kind!r})"
        if not self.prompt_ids:
            raise ValueError(f"{where}: prompt_ids is empty")
        if not self.completion_ids:
            raise ValueError(f"{where}: completion_ids is empty; a completion needs at least one token (its "
                             "stop token) to be trained on")
        if not math.isfinite(self.advantage):
            raise ValueError(f"{where}: advantage must be finite, got {self.advantage}")
        if self.kind not in TURN_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {TURN_KINDS}")
        if self.old_logprobs is not None and len(self.old_logprobs) != len(self.completion_ids):
            raise ValueError(f"{where}: old_logprobs has {len(self.old_logprobs)} values for "
                             f"{len(self.completion_ids)} completion tokens")

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class HasTokens(Protocol):
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class Scored:
    """A step's rollouts with their advantages and whether the DAPO filter keeps them."""

    rollouts: list[Rollout] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)
    turn_advantages: list[list[float] | None] = field(default_factory=list)  # per turn, where not broadcast

    @property
    def groups(self) -> dict[str, bool]:
        """group id -> kept."""
        return {r.group: k for r, k in zip(self.rollouts, self.kept, strict=True)}

    @property
    def primary_groups_kept(self) -> int:
        """Kept groups that stand for a row: what refilling filtered batches counts toward the batch size."""
        return len({r.group for r, k in zip(self.rollouts, self.kept, strict=True) if k and r.primary})


def score_groups(rollouts: list[Rollout], std_norm: bool, dynamic_filter: bool) -> Scored:
    """Advantages within each group (Dr. GRPO; /std with ``std_norm``) and the DAPO keep mask."""
    if not rollouts:
        return Scored()
    rewards = [r.reward for r in rollouts]
    groups = [r.group for r in rollouts]
    adv = group_advantages(rewards, groups, std_norm=std_norm).tolist()
    if dynamic_filter:
        kept = [not u for u in uniform_groups_mask(rewards, groups).tolist()]
    else:
        kept = [True] * len(rollouts)
    return Scored(list(rollouts), adv, kept, _turn_advantages(rollouts, std_norm))


def _turn_advantages(rollouts: list[Rollout], std_norm: bool) -> list[list[float] | None]:
    """Per-turn advantages of the rollouts that carry a ``credit`` split (None for the others): the match
    and IMR-bonus parts each get their own group advantage, then :func:`writer_credit` places them."""
    out: list[list[float] | None] = [None] * len(rollouts)
    credits = {i: r.credit for i, r in enumerate(rollouts) if r.credit is not None}
    if not credits:
        return out
    split = list(credits)
    groups = [rollouts[i].group for i in split]
    parts = max(len(c[1]) for c in credits.values())  # IMR prompts; a missing one is a bonus of 0, no writers
    padded = {i: [*c[1], *[(0.0, 0)] * (parts - len(c[1]))] for i, c in credits.items()}
    match = group_advantages([credits[i][0] for i in split], groups, std_norm=std_norm).tolist()
    bonus = [group_advantages([padded[i][q][0] for i in split], groups, std_norm=std_norm).tolist()
             for q in range(parts)]
    for n, i in enumerate(split):
        imr_parts = [(bonus[q][n], padded[i][q][1]) for q in range(parts)]
        out[i] = writer_credit(match[n], imr_parts, len(rollouts[i].turns))
    return out


def training_sequences(scored: Scored) -> list[TrainSequence]:
    """One sequence per turn of every kept rollout, each with its rollout's advantage (broadcast; per turn
    under ``rl.imr_credit=writer``) and the rollout as its session (``rl.loss_agg=session_mean`` weighs every
    rollout the same)."""
    seqs = []
    per_turn = scored.turn_advantages or [None] * len(scored.rollouts)
    for index, (r, adv, kept, turn_adv) in enumerate(zip(scored.rollouts, scored.advantages, scored.kept,
                                                         per_turn, strict=True)):
        if not kept:
            continue
        session = f"{r.group}#{index}"  # unique within the step (and rank): rollouts are never merged
        advs = turn_adv if turn_adv is not None else [adv] * len(r.turns)
        seqs += [TrainSequence(prompt_ids=list(t.prompt_ids), completion_ids=list(t.completion_ids),
                               advantage=float(a), old_logprobs=list(t.logprobs), kind=t.kind,
                               group=r.group, session=session)
                 for t, a in zip(r.turns, advs, strict=True) if t.completion_ids]
    return seqs


ANSWER_KINDS = ("final", "imr")  # turns that answer (capped by agent.answer_tokens)


def step_metrics(scored: Scored, counters: dict[str, float]) -> dict[str, float]:
    """The rollout half of a metrics row: rewards/metrics per kind, filter counts, lengths, cap-hit rates of
    memories and answers, and the sampled tokens' entropy estimate (what collapse shows in first)."""
    rewards: dict[str, list[float]] = defaultdict(list)
    values: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    turns = [t for r in scored.rollouts for t in r.turns]
    memory_caps = [t.hit_cap for t in turns if t.kind == "memory"]
    answer_caps = [t.hit_cap for t in turns if t.kind in ANSWER_KINDS]
    sampled = [lp for t in turns for lp in t.logprobs]
    for r in scored.rollouts:
        rewards[f"{r.kind.name}_reward"].append(r.reward)
        for key, value in r.metrics.items():
            values[key].append(float(value))
        for t in r.turns:
            lengths[f"len_{t.kind}"].append(len(t.completion_ids))
    out = {k: float(v) for k, v in counters.items()}
    out.update({key: sum(vs) / len(vs) for key, vs in (rewards | values | lengths).items()})
    out.update({f"{key}_std": statistics.pstdev(vs) for key, vs in rewards.items()})  # the per-step spread
    groups = scored.groups
    out.update(
        groups=float(len(groups)),
        filtered_groups=float(sum(not k for k in groups.values())),
        kept_rollouts=float(sum(scored.kept)),
        kept_groups=float(sum(groups.values())),
        memory_cap_hits=float(sum(memory_caps)),
        memory_cap_rate=sum(memory_caps) / len(memory_caps) if memory_caps else 0.0,
        answer_cap_rate=sum(answer_caps) / len(answer_caps) if answer_caps else 0.0,
        # mean -log p of the sampled tokens: an unbiased estimate of the sampling distribution's entropy
        # (nats/token) over every turn rolled out, kept or filtered; collapse drives it toward 0
        sample_entropy=-sum(sampled) / len(sampled) if sampled else 0.0,
        tokens_generated=float(sum(len(t.completion_ids) for r in scored.rollouts for t in r.turns)),
    )
    return out


def sample_records(scored: Scored, count: int) -> list[dict[str, Any]]:
    """Readable records of the first ``count`` rollouts of primary groups (not IMR answers), for
    samples.jsonl."""
    out = []
    for r, adv, kept in zip(scored.rollouts, scored.advantages, scored.kept, strict=True):
        if r.primary and len(out) < count:
            out.append({"group": r.group, "kind": r.kind.name, "advantage": adv, "kept": kept, **r.record})
    return out
