"""The joint E2E + IMR advantages of MEMTRAIN.md section 4 inside verl.

verl's multi-trajectory GRPO (``compute_advantage_for_multi_trajectories``) broadcasts one advantage per
session (computed from the session's last output) to every output of the session, so IMR answers would get
the E2E advantage; and a registered estimator only sees each output's prompt ``uid``, not which rollout or
group it belongs to. So:

- :func:`joint_advantages` is the pure part: given each output's rollout id, group and reward (written by the
  agent loop into ``extra_fields["memtrain"]``), it computes ``memtrain.rl.core.group_advantages`` over the
  rollouts (each counted once, however many outputs it has) and broadcasts each rollout's advantage to its
  outputs - exactly what the native trainer does (``memtrain.rl.trainer.score_groups``).
- ``memtrain_joint`` is registered with ``register_adv_est``; it reads the per-output metadata of the batch
  being processed from :data:`_ROWS`.
- ``memtrain_sync`` (``register_trainer``) is verl's synchronous v1 trainer whose ``_compute_advantage``
  fetches that metadata from TransferQueue and then runs verl's own advantage step unchanged (KL-in-reward,
  rollout correction, write-back), with ``algorithm.adv_estimator=memtrain_joint``.

verl's padding rows (``is_padding`` tags, copies of a real row with an empty loss mask) get advantage 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_adv_est
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from memtrain.backends.verl import ESTIMATOR_NAME, META_KEY, TRAINER_MODE
from memtrain.rl.core import group_advantages, uniform_groups_mask


@dataclass(frozen=True)
class RowMeta:
    """What the advantage of one verl output depends on."""

    rollout: str  # unique within the step
    group: str
    reward: float
    kind: str


def row_meta(extra_fields: Any, key: str) -> RowMeta:
    """The :class:`RowMeta` the agent loop stored in an output's ``extra_fields`` (``key``: for errors)."""
    fields = getattr(extra_fields, "data", extra_fields)
    meta = fields.get(META_KEY) if isinstance(fields, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"verl output {key!r} has no extra_fields[{META_KEY!r}]; the {ESTIMATOR_NAME!r} "
                         "estimator needs outputs of memtrain's agent loop (agent_name memtrain_agent)")
    try:
        return RowMeta(str(meta["rollout"]), str(meta["group"]), float(meta["reward"]), str(meta["kind"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"verl output {key!r}: malformed extra_fields[{META_KEY!r}] = {meta!r} "
                         f"({exc})") from None


def _rollouts(metas: Sequence[RowMeta | None]) -> dict[str, tuple[str, float]]:
    rollouts: dict[str, tuple[str, float]] = {}
    for m in metas:
        if m is None:
            continue
        seen = rollouts.setdefault(m.rollout, (m.group, m.reward))
        if seen != (m.group, m.reward):
            raise ValueError(f"rollout {m.rollout!r} has outputs with different group/reward: {seen} vs "
                             f"{(m.group, m.reward)}")
    return rollouts


def joint_advantages(metas: Sequence[RowMeta | None], std_norm: bool = False) -> list[float]:
    """One advantage per output (0 for ``None``, a padding row): Dr. GRPO within each group of rollouts
    (``/std`` with ``std_norm``), each rollout's advantage broadcast to all of its outputs."""
    rollouts = _rollouts(metas)
    if not rollouts:
        return [0.0] * len(metas)
    ids = list(rollouts)
    adv = group_advantages([rollouts[i][1] for i in ids], [rollouts[i][0] for i in ids], std_norm=std_norm)
    by_id = dict(zip(ids, adv.tolist(), strict=True))
    return [by_id[m.rollout] if m is not None else 0.0 for m in metas]


def group_stats(metas: Sequence[RowMeta | None]) -> dict[str, float]:
    """Step counters in the native trainer's terms: groups, groups with all-equal rewards, rollouts."""
    rollouts = _rollouts(metas)
    if not rollouts:
        return {"memtrain/groups": 0.0, "memtrain/uniform_groups": 0.0, "memtrain/rollouts": 0.0}
    groups = [g for g, _ in rollouts.values()]
    uniform = uniform_groups_mask([r for _, r in rollouts.values()], groups).tolist()
    return {"memtrain/groups": float(len(set(groups))),
            "memtrain/uniform_groups": float(len({g for g, u in zip(groups, uniform, strict=True) if u})),
            "memtrain/rollouts": float(len(rollouts))}


_ROWS: ContextVar[list[RowMeta | None] | None] = ContextVar("memtrain_verl_rows", default=None)


@contextmanager
def batch_rows(metas: list[RowMeta | None]) -> Iterator[None]:
    """Make ``metas`` (one per output of the batch, in batch order) visible to the estimator."""
    token = _ROWS.set(metas)
    try:
        yield
    finally:
        _ROWS.reset(token)


@register_adv_est(ESTIMATOR_NAME)
def compute_memtrain_joint_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                     config: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage-estimator interface: (advantages, returns), both [batch, response_len]."""
    metas = _ROWS.get()
    if metas is None:
        raise RuntimeError(f"algorithm.adv_estimator={ESTIMATOR_NAME} needs the per-output groups that "
                           f"trainer.v1.trainer_mode={TRAINER_MODE} provides; set both (as `memtrain train "
                           "--backend verl` renders them)")
    if len(metas) != token_level_rewards.shape[0]:
        raise RuntimeError(f"{ESTIMATOR_NAME}: {len(metas)} output descriptions for a batch of "
                           f"{token_level_rewards.shape[0]} rows")
    std_norm = bool(config.get("norm_adv_by_std_in_grpo", False)) if config is not None else False
    adv = torch.tensor(joint_advantages(metas, std_norm), dtype=torch.float32,
                       device=token_level_rewards.device)
    scores = adv.unsqueeze(-1) * response_mask.to(torch.float32)
    return scores, scores


@register_trainer(TRAINER_MODE)
class MemtrainTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer, handing the ``memtrain_joint`` estimator each output's group.

    Selected by ``trainer.v1.trainer_mode=memtrain_sync``; verl keys its sync-only behaviour (replay buffer,
    batch refill, checkpoint contents) on the mode name ``sync``, so the mode is renamed back to that before
    verl's constructor reads it.
    """

    def __init__(self, config: Any) -> None:
        from omegaconf import open_dict

        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        if self.config.algorithm.adv_estimator != ESTIMATOR_NAME:
            return super()._compute_advantage(batch, metrics)
        from verl.trainer.ppo.v1 import trainer_base

        data = trainer_base.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                            select_fields=["extra_fields"])
        extra = list(data["extra_fields"])
        metas: list[RowMeta | None] = [
            None if tag.get("is_padding", False) else row_meta(fields, key)
            for key, tag, fields in zip(batch.keys, batch.tags, extra, strict=True)]
        metrics.update(group_stats(metas))
        with batch_rows(metas):
            return super()._compute_advantage(batch, metrics)
