"""Data-parallel ``memtrain train`` under ``torchrun``: each rank rolls out whole rows, one shared update.

``torchrun --nproc-per-node N [--nnodes M ...] -m memtrain train --config ...`` starts N x M copies of the
trainer; :func:`init_from_env` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and joins the process group (NCCL on GPUs, gloo on CPUs). Per step:

1. every rank draws the same batch of rows (same seed, same data position) and keeps its contiguous share
   (:meth:`DistContext.shard`): whole rows, so a row's GRPO groups (its G1 trajectories, their IMR groups)
   never straddle ranks and each rank's advantages are exactly the single-process ones;
2. the policy loss is normalised by the GLOBAL number of sequences / tokens / sessions
   (:meth:`DistContext.totals`; a session = one rollout, never split over ranks since rows are whole), each
   rank back-propagates its micro-batches, and :meth:`DistContext.reduce_gradients` sums the gradients over
   ranks: the result is the gradient of the whole batch, as one process would compute it, and every rank
   then takes the same clipped optimizer step (a non-finite loss or gradient on any rank skips it everywhere);
3. step statistics are combined over ranks (:meth:`DistContext.sum_values`, :func:`gather_scored`,
   :func:`reduce_update_stats`); only rank 0 writes metrics, samples and checkpoints
   (:meth:`DistContext.on_main`).

Random draws of the rollouts (sampling seeds, IMR choices) derive from each rank's own rows, so with sampling
an N-process run draws different (equally distributed) samples than a 1-process run; with a deterministic
engine the two runs take the same steps (tests/test_distributed.py).

``train.parallel=fsdp2`` shards the weights, gradients and optimizer state over the ranks instead of keeping a
full copy on each (:func:`shard_model`, PyTorch's ``fully_shard``): the same steps, for models that do not fit
one device. Every forward/backward then all-gathers and reduce-scatters, so all ranks must run the same
passes: the rollout runs on weights gathered once for it (:func:`gathered_for_rollout`) and the update pads
the ranks with fewer micro-batches (``memtrain.rl.update.policy_update``) (tests/test_fsdp.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from memtrain.agent.types import TURN_KINDS
from memtrain.errors import UserError
from memtrain.log import logger
from memtrain.rl.core import num_sessions
from memtrain.rl.rollout import Scored

T = TypeVar("T")

# Update statistics (memtrain.rl.update.policy_update) by how they combine over ranks. The loss terms are
# already normalised by the global totals, so their per-rank parts add up; means are re-weighted by tokens
# or sequences; anything else (grad_norm, lr, skipped_*) is computed after the gradient reduction and equal
# on every rank.
SUM_STATS = frozenset({"loss", "pg_loss", "kl", "num_seqs", "num_tokens", "num_sessions", "num_micro_batches",
                       "num_seqs_zero_adv_skipped", *(f"num_seqs_{kind}" for kind in TURN_KINDS)})
TOKEN_MEAN_STATS = frozenset({"entropy", "clip_frac", "approx_kl", "ratio_mean", "old_logprob_mean_diff",
                              "mismatch_kl", "tis_frac", "tis_weight_mean", "tis_trunc_frac"})
SEQ_MEAN_STATS = frozenset({"adv_mean", "adv_abs_mean", "old_logprob_sampler_frac"})
MIN_STATS = frozenset({"ratio_min"})
MAX_STATS = frozenset({"ratio_max", "old_logprob_max_diff", "tis_ratio_max"})

_BUCKET_ELEMENTS = 1 << 25  # gradients are summed in flat buckets of at most this many elements


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UserError(f"${name} is not set; launch data-parallel training with torchrun, which sets "
                            "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
        return default
    if not raw.strip().lstrip("-").isdigit():
        raise UserError(f"${name}={raw!r}: expected an integer")
    return int(raw)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective buffers live: NCCL needs them on this rank's GPU
    parallel: str = "ddp"  # train.parallel: "ddp" or "fsdp2"
    joined: bool = False  # in a process group even as its only rank (FSDP2 under torchrun --nproc-per-node 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.joined

    @property
    def fsdp(self) -> bool:
        """Weights sharded with FSDP2 (``train.parallel=fsdp2`` under torchrun, on one rank or more)."""
        return self.enabled and self.parallel == "fsdp2"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------------------------

    def shard(self, rows: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``rows`` (sizes differ by at most one; rank order = row order)."""
        n, w, r = len(rows), self.world_size, self.rank
        return list(rows[r * n // w: (r + 1) * n // w])

    # -- collectives ----------------------------------------------------------------------------------------

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum over ranks of a dict of numbers (keys: the union over ranks; missing = 0)."""
        if not self.enabled:
            return dict(values)
        keys = sorted(set().union(*self.all_gather_object(sorted(values))))
        t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.cpu().tolist(), strict=True))

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather_object(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; an exception on rank 0 is raised on
        every rank (rank 0's own, a RuntimeError naming it elsewhere), so no rank is left waiting."""
        if not self.enabled:
            return fn()
        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                payload[0] = ("ok", fn())
            except Exception as exc:
                error = exc
                payload[0] = ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if error is not None:
            raise error
        if status == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Make every rank start from rank 0's weights (and buffers)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    # -- the update ----------------------------------------------------------------------------------------

    def totals(self, seqs: Sequence[Any]) -> tuple[int, int, int]:
        """(sequences, completion tokens, sessions) of the whole step, over all ranks: the loss normalisers.

        A session (``TrainSequence.session``, one rollout; None = a session of its own) lives on one rank,
        because whole rows are sharded, so the per-rank counts simply add up.
        """
        n_sessions = num_sessions([getattr(s, "session", None) for s in seqs])
        local = torch.tensor([len(seqs), sum(len(s.completion_ids) for s in seqs), n_sessions],
                             dtype=torch.int64, device=self.device)
        if self.enabled:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        n_seqs, n_tokens, n_sessions = local.cpu().tolist()
        return int(n_seqs), int(n_tokens), int(n_sessions)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], finite: bool) -> bool:
        """Sum every parameter's gradient over ranks and return whether the loss was finite on every rank.
        Buckets of flattened gradients keep the number of collectives small. Under FSDP2 the backward passes
        already summed them (reduce-scatter into each rank's shard): only the finite flag is agreed on."""
        if not self.enabled:
            return finite
        flag = torch.tensor([1 if finite else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag.item()):
            return False
        if self.fsdp:
            return True
        # a parameter no rank has a gradient for stays without one (the optimizer skips it, as it would in
        # one process); one that only some ranks touched counts as zero on the others
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p, used in zip(params, has_grad.cpu().tolist(), strict=True):
            if not used:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if bucket and (size >= _BUCKET_ELEMENTS or p.grad.dtype != bucket[0].grad.dtype
                           or p.grad.device != bucket[0].grad.device):
                self._all_reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            self._all_reduce_bucket(bucket)
        return True

    @staticmethod
    def _all_reduce_bucket(params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()  # type: ignore[union-attr]
            g.copy_(flat[offset: offset + n].view_as(g))  # type: ignore[union-attr]
            offset += n


def shard_model(model: torch.nn.Module, ctx: DistContext, frozen: bool = False) -> None:
    """Shard ``model`` in place with FSDP2: each transformer block (the classes HF lists in
    ``model._no_split_modules``), then the root, on a 1-D mesh over all ranks.

    Gradients are SUMMED over ranks (divide factor 1, plain SUM collectives: gloo has no PREMUL_SUM), as
    :meth:`DistContext.reduce_gradients` does, because the loss is already normalised by the global batch.
    The root keeps its weights from forward to backward (the usual choice); a ``frozen`` model (the KL
    reference, never backward) frees them after every forward. Build the optimizer afterwards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise UserError(f"train.parallel=fsdp2: {type(model).__name__} does not name its transformer blocks "
                        "(model._no_split_modules), so it cannot be sharded block by block; use ddp")
    mesh = init_device_mesh("cuda" if ctx.device.startswith("cuda") else "cpu", (ctx.world_size,))
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=frozen)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@contextmanager
def gathered_for_rollout(model: torch.nn.Module) -> Iterator[None]:
    """Hold ``model``'s full weights on every rank for the whole block (no-op unless sharded by FSDP2).

    Ranks generate different numbers of tokens, i.e. run different numbers of forward passes, so per-forward
    all-gathers would deadlock: all-gather every FSDP module once here (as verl syncs full weights to its
    rollout engine), keep them through every forward, and free them afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:  # back to the training setting of shard_model
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)


def gather_scored(scored: Scored, ctx: DistContext) -> Scored:
    """The step's scored rollouts of all ranks, concatenated in rank order (= the single-process order of
    rows), for rank 0's metrics and samples. Prompt token ids are dropped on the way (not needed there)."""
    if not ctx.enabled:
        return scored
    light = replace(scored, rollouts=[replace(r, turns=[replace(t, prompt_ids=[]) for t in r.turns])
                                      for r in scored.rollouts])
    parts = ctx.all_gather_object(light)
    return replace(parts[0], rollouts=[r for p in parts for r in p.rollouts],
                   advantages=[a for p in parts for a in p.advantages],
                   kept=[k for p in parts for k in p.kept])


class NullRunLogger:
    """What ranks other than 0 log to: nothing (``memtrain.rl.metrics.RunLogger``'s interface)."""

    def log_step(self, row: dict[str, Any]) -> dict[str, Any]:
        return row

    def log_samples(self, step: int, records: Sequence[dict[str, Any]]) -> None:
        return None

    def log_validation(self, step: int, summary: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def reduce_update_stats(stats: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """Combine ``policy_update`` statistics over ranks (see the *_STATS sets); other values are the same
    on every rank and pass through."""
    if not ctx.enabled:
        return stats
    parts = ctx.all_gather_object(stats)
    tokens = [float(p.get("num_tokens", 0.0)) for p in parts]
    seqs = [float(p.get("num_seqs", 0.0)) for p in parts]
    out: dict[str, Any] = {}
    for key in stats:
        values = [p.get(key) for p in parts]
        if isinstance(stats[key], str):
            out[key] = values[0] if len(set(values)) == 1 else "mixed"
            continue
        nums = [float(v) for v in values if v is not None]
        if key in SUM_STATS:
            out[key] = sum(nums)
        elif key in TOKEN_MEAN_STATS or key in SEQ_MEAN_STATS:
            weights = tokens if key in TOKEN_MEAN_STATS else seqs
            pairs = [(float(v), w) for v, w in zip(values, weights, strict=True)
                     if v is not None and not math.isnan(float(v)) and w > 0]
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total else math.nan
        elif key in MIN_STATS or key in MAX_STATS:  # over the ranks that trained on any token
            seen = [float(v) for v, w in zip(values, tokens, strict=True)
                    if v is not None and w > 0 and not math.isnan(float(v))]
            pick = min if key in MIN_STATS else max
            out[key] = pick(seen) if seen else stats[key]
        else:
            out[key] = stats[key]
    return out


# Whether init_from_env created the default process group (then shutdown destroys it). In a single process
# the vLLM engine creates one of its own, which its shutdown at exit destroys: destroying it first made that
# shutdown raise "Invalid process group specified" after a finished run.
_owned_group = False


def init_from_env(device: str, parallel: str = "ddp") -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL for ``device='cuda'``, else gloo), or as its
    one rank for ``parallel='fsdp2'`` under torchrun (the sharded code paths on one device). ``parallel``:
    ``train.parallel`` (ignored in a process torchrun did not start).

    On GPUs each process uses GPU LOCAL_RANK. Ranks other than 0 log warnings only, so the console shows one
    copy of the progress lines.
    """
    global _owned_group
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise UserError(f"$WORLD_SIZE={world}: expected >= 1")
    if world == 1 and not (parallel == "fsdp2" and "RANK" in os.environ):
        return DistContext()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UserError(f"$RANK={rank} is outside 0..{world - 1} ($WORLD_SIZE={world})")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"$LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                            "GPU(s); use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        _owned_group = True
    if rank != 0:
        logger.setLevel(logging.WARNING)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       device=f"cuda:{local_rank}" if device == "cuda" else "cpu", parallel=parallel,
                       joined=world == 1)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group that :func:`init_from_env` joined (one it did not create, such as vLLM's in a
    single process, is left to its owner), by default after a barrier so rank 0 does not close the store
    under the others (pass ``barrier=False`` on an error path, where the other ranks may never arrive).

    A process that exits with gloo's threads still running can abort ("terminate called without an active
    exception"), failing a run that finished.
    """
    global _owned_group
    if _owned_group and dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _owned_group = False
