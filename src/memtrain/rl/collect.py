"""The data stream and the rollout phase of one training step: which rows a step reads (a seeded, epoch-wise
permutation, resumable from a position), and rolling them out - with DAPO's dynamic sampling, more rows until
enough groups survive the filter (docs/method.md section 4).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from memtrain.agent.seeding import derive_seed
from memtrain.config import Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.rl.distributed import DistContext
from memtrain.rl.rollout import Rollout, Scored, Task, score_groups


def batch_indices(num_rows: int, seed: int, shuffle: bool, position: int, count: int) -> list[int]:
    """Row indices ``position .. position + count - 1`` of the endless data stream.

    The stream is epoch after epoch of all rows, each epoch in its own seeded permutation (identity without
    ``shuffle``), so any position can be recomputed from (seed, position) alone: that is all resume stores.
    """
    if num_rows < 1:
        raise ValueError("batch_indices: the dataset has no rows")
    out = []
    perms: dict[int, np.ndarray] = {}
    for pos in range(position, position + count):
        epoch, offset = divmod(pos, num_rows)
        if epoch not in perms:
            perms[epoch] = (
                np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle else np.arange(num_rows)
            )
        out.append(int(perms[epoch][offset]))
    return out


def unique_ids(rows: list[dict], seen: dict[str, int]) -> list[dict]:
    """Copies of ``rows`` whose ids are unique within a step (``id@2`` for a row drawn a second time, e.g.
    when a small dataset wraps into its next epoch inside one batch), so every GRPO group id is distinct."""
    out = []
    for row in rows:
        rid = str(row["id"])
        seen[rid] = seen.get(rid, 0) + 1
        out.append(row if seen[rid] == 1 else {**row, "id": f"{rid}@{seen[rid]}"})
    return out


def _rollout_round(
    task: Task, rows: list[dict], engine: Engine, config: Config, step: int, round_index: int, rank: int = 0
) -> tuple[list[Rollout], dict[str, float]]:
    """One call of the task with this (step, round)'s own sampling seed and IMR random stream (data-parallel:
    and the rank's own; rank 0 draws what a single process would)."""
    seed = derive_seed(config.train.seed, step, round_index, *([rank] if rank else []))
    params = SamplingParams(
        temperature=config.rl.temperature,
        top_p=config.rl.top_p,
        max_tokens=config.agent.memory_tokens,
        seed=seed,
    )
    return task.rollout(rows, engine, params, config.rl.group_size, random.Random(seed))


@dataclass
class RolloutBatch:
    """What one step's rollout phase produced."""

    scored: Scored
    counters: dict[str, float]
    position: int  # data stream position after this step's rows
    samples: int  # rows rolled out (batch_size x rounds at most)
    rounds: int


def refill_rows(kept: int, target: int, rows_so_far: int, batch_size: int, rows_count_groups: bool) -> int:
    """Rows the next dynamic-sampling round rolls out: none once ``target`` groups are kept; else, when what
    is counted is rows (DAPO: primary groups, one per row), exactly the missing ones; when it is groups of
    any kind, the missing groups over the groups kept per row so far (``batch_size`` when none was kept),
    rounded up and at most ``batch_size`` - only as many extra rows as the filter is likely to need."""
    missing = target - kept
    if missing <= 0:
        return 0
    if rows_count_groups:
        return min(missing, batch_size)
    if kept == 0:
        return batch_size
    return max(1, min(batch_size, math.ceil(missing * rows_so_far / kept)))


def collect_rollouts(task: Task, rows: list[dict], engine: Engine, config: Config, step: int,
                     position: int, ctx: DistContext | None = None) -> RolloutBatch:
    """Roll out ``train.batch_size`` rows from ``position``; with ``rl.fill_filtered_batches`` (DAPO's
    dynamic sampling), roll out more rows (up to ``train.fill_max_rounds`` rounds, :func:`refill_rows`)
    until ``batch_size`` primary groups - or ``rl.fill_min_groups`` groups of any kind - survive the DAPO
    filter. Data-parallel (``ctx``): this rank rolls out its share of the rows; the refill count is global."""
    ctx = ctx or DistContext()
    rollouts: list[Rollout] = []
    counters: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = {}
    rounds = samples = 0
    need = config.train.batch_size
    any_kind = config.rl.fill_min_groups is not None
    target = config.rl.fill_min_groups if any_kind else config.train.batch_size
    while True:
        indices = batch_indices(len(rows), config.train.seed, config.data.shuffle, position, need)
        picked = [rows[i] for i in indices]
        position += need
        samples += need
        new, round_counters = _rollout_round(task, ctx.shard(unique_ids(picked, seen)), engine, config, step,
                                             rounds, ctx.rank)
        rounds += 1
        rollouts += new
        for key, value in round_counters.items():
            counters[key] += value
        scored = score_groups(rollouts, config.rl.adv_std_norm, config.rl.dynamic_filter)
        local = sum(scored.groups.values()) if any_kind else scored.primary_groups_kept
        kept = int(ctx.sum_values({"kept": local})["kept"])
        need = refill_rows(kept, target, samples, config.train.batch_size, rows_count_groups=not any_kind)
        refill = config.rl.fill_filtered_batches and config.rl.dynamic_filter
        if not (refill and need > 0 and rounds < config.train.fill_max_rounds):
            return RolloutBatch(scored, dict(counters), position, samples, rounds)
