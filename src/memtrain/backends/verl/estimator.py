"""The joint E2E + IMR advantages of docs/method.md section 4 inside verl.

verl's multi-trajectory GRPO (``compute_advantage_for_multi_trajectories``) broadcasts one advantage per
session (computed from the session's last output) to every output of the session, so IMR answers would get
the E2E advantage; and a registered estimator only sees each output's prompt ``uid``, not which rollout or
group it belongs to. So:

- :func:`joint_advantages` is the pure part: given each output's rollout id, group and reward (written by the
  agent loop into ``extra_fields["memtrain"]``), it computes ``memtrain.rl.core.group_advantages`` over the
  rollouts (each counted once, however many outputs it has) and broadcasts each rollout's advantage to its
  outputs - exactly what the native trainer does (``memtrain.rl.rollout.score_groups``).
- ``memtrain_joint`` is registered with ``register_adv_est``; it reads the per-output metadata of the batch
  being processed from :data:`_ROWS`.
- ``memtrain_sync`` (``register_trainer``) is verl's synchronous v1 trainer whose ``_compute_advantage``
  fetches that metadata from TransferQueue and then runs verl's own advantage step unchanged (KL-in-reward,
  rollout correction, write-back), with ``algorithm.adv_estimator=memtrain_joint``.

The DAPO filter is the native one too (:func:`kept_outputs`, ``memtrain.dynamic_filter`` in the rendered
config): every E2E group and every IMR group whose rewards are all equal is dropped on its own. verl cannot
remove rows from a batch after its rollouts, so ``memtrain_sync`` empties the response and loss masks of the
dropped outputs (no policy-gradient, KL or entropy term, no tokens in ``token-mean``'s count) and hands verl's
actor the number of outputs left as the ``seq-mean`` denominator (verl's own is the padded mini-batch size),
so both losses equal the native trainer's on its kept sequences; a step with nothing kept skips the actor
update, as the native trainer skips its optimizer step.

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

from memtrain.backends.verl import CONFIG_SECTION, ESTIMATOR_NAME, META_KEY, TRAINER_MODE
from memtrain.log import logger
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


def kept_outputs(metas: Sequence[RowMeta | None], dynamic_filter: bool) -> list[bool]:
    """Which outputs train (False for ``None``, a padding row): all of them, or with ``dynamic_filter``
    (DAPO, as ``memtrain.rl.rollout.score_groups``) those whose rollout's group has unequal rewards - an E2E
    group and each IMR group decided on its own, each rollout counted once."""
    rollouts = _rollouts(metas)
    if not dynamic_filter or not rollouts:
        return [m is not None for m in metas]
    ids = list(rollouts)
    uniform = uniform_groups_mask([rollouts[i][1] for i in ids], [rollouts[i][0] for i in ids]).tolist()
    keep = {i: not u for i, u in zip(ids, uniform, strict=True)}
    return [m is not None and keep[m.rollout] for m in metas]


def group_stats(metas: Sequence[RowMeta | None], dynamic_filter: bool = False) -> dict[str, float]:
    """Step counters in the native trainer's terms: groups, groups with all-equal rewards, groups the DAPO
    filter dropped (those with ``dynamic_filter``), rollouts."""
    rollouts = _rollouts(metas)
    if not rollouts:
        return {"memtrain/groups": 0.0, "memtrain/uniform_groups": 0.0, "memtrain/filtered_groups": 0.0,
                "memtrain/rollouts": 0.0}
    groups = [g for g, _ in rollouts.values()]
    uniform = uniform_groups_mask([r for _, r in rollouts.values()], groups).tolist()
    n_uniform = float(len({g for g, u in zip(groups, uniform, strict=True) if u}))
    return {"memtrain/groups": float(len(set(groups))), "memtrain/uniform_groups": n_uniform,
            "memtrain/filtered_groups": n_uniform if dynamic_filter else 0.0,
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


class _ActorWorkers:
    """verl's actor worker group with the ``seq-mean`` denominator of ``update_actor`` replaced."""

    def __init__(self, workers: Any, global_batch_size: int) -> None:
        self._workers, self._global_batch_size = workers, global_batch_size

    def update_actor(self, batch: Any) -> Any:
        batch.extra_info["global_batch_size"] = self._global_batch_size
        return self._workers.update_actor(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._workers, name)


@register_trainer(TRAINER_MODE)
class MemtrainTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer, handing the ``memtrain_joint`` estimator each output's group and
    training on the native trainer's kept outputs only.

    Selected by ``trainer.v1.trainer_mode=memtrain_sync``; verl keys its sync-only behaviour (replay buffer,
    batch refill, checkpoint contents) on the mode name ``sync``, so the mode is renamed back to that before
    verl's constructor reads it.
    """

    _train_outputs: int | None = None  # set by _compute_advantage for the _update_actor that follows

    def __init__(self, config: Any) -> None:
        from omegaconf import open_dict

        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        if self.config.algorithm.adv_estimator != ESTIMATOR_NAME:
            return super()._compute_advantage(batch, metrics)
        from omegaconf import OmegaConf
        from verl.trainer.ppo.v1 import trainer_base

        tq, keys, partition = trainer_base.tq, list(batch.keys), batch.partition_id
        extra = list(tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=["extra_fields"])
                     ["extra_fields"])
        metas: list[RowMeta | None] = [
            None if tag.get("is_padding", False) else row_meta(fields, key)
            for key, tag, fields in zip(keys, batch.tags, extra, strict=True)]
        dynamic_filter = bool(OmegaConf.select(self.config, f"{CONFIG_SECTION}.dynamic_filter", default=True))
        keep = kept_outputs(metas, dynamic_filter)
        metrics.update(group_stats(metas, dynamic_filter))
        with batch_rows(metas):
            batch = super()._compute_advantage(batch, metrics)
        # after verl's step, which may itself rewrite the response mask (rollout correction's rejection)
        masks = list(tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=["response_mask"])
                     ["response_mask"].unbind(0))
        dropped = [i for i, (m, k) in enumerate(zip(metas, keep, strict=True)) if m is not None and not k]
        if dropped:
            from tensordict import TensorDict

            zeros = torch.nested.as_nested_tensor([torch.zeros_like(masks[i]) for i in dropped],
                                                   layout=torch.jagged)
            tq.kv_batch_put(keys=[keys[i] for i in dropped], partition_id=partition,
                            fields=TensorDict({"response_mask": zeros, "loss_mask": zeros.clone()},
                                              batch_size=[len(dropped)]))
        # outputs with an empty response (a cut-off turn) are no training sequence natively either
        self._train_outputs = sum(1 for m, k in zip(masks, keep, strict=True) if k and bool(m.any()))
        metrics["memtrain/train_outputs"] = float(self._train_outputs)
        return batch

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        """The actor update on the kept outputs. verl divides the ``seq-mean`` loss by the padded mini-batch
        size (``ppo_mini_batch_size * rollout.n``, dropped and padding rows included), the native trainer by
        its kept sequences: with one mini-batch per step (as rendered) the kept count is handed over instead
        (``token-mean`` needs nothing: verl counts the loss-mask tokens, and dropped outputs have none). With
        nothing kept there is no update at all, as natively (verl would step the optimizer on a zero
        gradient, which still moves the weights through Adam's momentum and weight decay)."""
        outputs, self._train_outputs = self._train_outputs, None
        if outputs is None:
            return super()._update_actor(batch, metrics)
        metrics["memtrain/skipped_empty"] = float(outputs == 0)
        if outputs == 0:
            logger.info("every group of this step was dropped by the DAPO filter: no actor update")
            return batch
        roles = self.config.actor_rollout_ref
        mini_batch = roles.actor.ppo_mini_batch_size * roles.rollout.n
        if len(batch) > mini_batch:
            logger.warning("%d outputs make more than one mini-batch of %d (actor.ppo_mini_batch_size x "
                           "rollout.n): seq-mean keeps verl's denominator, the mini-batch size", len(batch),
                           mini_batch)
            return super()._update_actor(batch, metrics)
        workers = self.actor_rollout_wg
        self.actor_rollout_wg = _ActorWorkers(workers, outputs)
        try:
            return super()._update_actor(batch, metrics)
        finally:
            self.actor_rollout_wg = workers
