"""``memtrain train``: the GRPO training loop for the memory agent, one script from top to bottom.

Per step (MEMTRAIN.md section 4):

1. draw ``train.batch_size`` rows (deterministic order from the seed, reshuffled every epoch);
2. roll out the task (``memtrain.rl.tasks``): G1 memory-agent trajectories per row, plus the IMR groups of
   the proxy task, with the local HF engine sampling from the very model being trained (no weight copy);
3. Dr. GRPO advantages within each group, DAPO filter (groups whose rewards are all equal are dropped;
   with ``rl.fill_filtered_batches`` more rows are rolled out until enough groups survive);
4. one training sequence per turn (prompt + completion as sampled, the rollout's advantage broadcast), and
   exactly one optimizer step (``memtrain.rl.update.policy_update``);
5. log a metrics row, sample trajectories every ``train.sample_every`` steps, a checkpoint every
   ``train.checkpoint_every`` steps and at the end (never right after a skipped step, so the newest
   checkpoint always follows a real update).

Determinism: every random draw of a step (rollout sampling seeds, IMR choices) derives from
``(train.seed, step, round)``, the data order from ``(train.seed, epoch)``; with the optimizer, scheduler and
RNG states in the checkpoint, a resumed run repeats exactly the steps an uninterrupted one would take.
Non-finite loss or gradients skip the step (no parameter change), and so does a step that made a weight
non-finite (undone from a copy, ``memtrain.rl.update.SNAPSHOT_MAX_BYTES``); ``train.max_nonfinite`` in a row
stop the run with :class:`NonFiniteError`, leaving the last checkpoint as it was.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtrain.agent.loop import derive_seed
from memtrain.config import Config, load_config, save_config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.io import LOCK_FILE, acquire_dir_lock, release_dir_lock
from memtrain.log import logger
from memtrain.rl import checkpoint as ckpt_io
from memtrain.rl.core import group_advantages, uniform_groups_mask
from memtrain.rl.distributed import (
    DistContext,
    NullRunLogger,
    gather_scored,
    gathered_for_rollout,
    init_from_env,
    reduce_update_stats,
    shard_model,
)
from memtrain.rl.metrics import RunLogger
from memtrain.rl.optim import apply_lora, build_optimizer, build_scheduler
from memtrain.rl.tasks import Rollout, Task, check_rows, make_task
from memtrain.rl.update import NonFiniteParamsError, TrainSequence, check_trainable_sampling, policy_update

CONFIG_FILE = "config.yaml"
_RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", ckpt_io.CHECKPOINTS_DIR)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the run stopped."""


# --------------------------------------------------------------------------------------------------------
# Pieces of the loop (pure or nearly so; the loop itself is ``train`` below)
# --------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """torch CPU threads: the config value, else $MEMTRAIN_THREADS, else every core."""
    if threads is None:
        env = os.environ.get("MEMTRAIN_THREADS")
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"MEMTRAIN_THREADS={env!r}: expected a positive integer")
            threads = int(env)
        else:
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


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


@dataclass
class Scored:
    """A step's rollouts with their advantages and whether the DAPO filter keeps them."""

    rollouts: list[Rollout] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)

    @property
    def groups(self) -> dict[str, bool]:
        """group id -> kept."""
        return {r.group: k for r, k in zip(self.rollouts, self.kept, strict=True)}


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
    return Scored(list(rollouts), adv, kept)


def training_sequences(scored: Scored) -> list[TrainSequence]:
    """One sequence per turn of every kept rollout, each with its rollout's advantage (broadcast) and the
    rollout as its session (``rl.loss_agg=session_mean`` weighs every rollout the same)."""
    seqs = []
    for index, (r, adv, kept) in enumerate(zip(scored.rollouts, scored.advantages, scored.kept, strict=True)):
        if not kept:
            continue
        session = f"{r.group}#{index}"  # unique within the step (and rank): rollouts are never merged
        for turn in r.turns:
            if turn.completion_ids:
                seqs.append(
                    TrainSequence(
                        prompt_ids=list(turn.prompt_ids),
                        completion_ids=list(turn.completion_ids),
                        advantage=float(adv),
                        old_logprobs=list(turn.logprobs),
                        kind=turn.kind,
                        group=r.group,
                        session=session,
                    )
                )
    return seqs


def primary_groups_kept(scored: Scored) -> int:
    """Kept groups that stand for a row (E2E/search groups; IMR groups are per trajectory)."""
    return len({r.group for r, k in zip(scored.rollouts, scored.kept, strict=True) if k and r.kind != "imr"})


def step_metrics(scored: Scored, counters: dict[str, float]) -> dict[str, float]:
    """The rollout half of a metrics row: rewards/metrics per kind, filter counts, lengths, cap hits."""
    out: dict[str, float] = {}
    rewards: dict[str, list[float]] = defaultdict(list)
    values: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    cap_hits = memory_turns = tokens = 0
    for r in scored.rollouts:
        rewards[r.kind].append(r.reward)
        for key, value in r.metrics.items():
            values[key].append(float(value))
        for t in r.turns:
            lengths[t.kind].append(len(t.completion_ids))
            tokens += len(t.completion_ids)
            if t.kind == "memory":
                memory_turns += 1
                cap_hits += int(t.hit_cap)
    out.update({k: float(v) for k, v in counters.items()})
    for kind, rs in rewards.items():
        out[f"{kind}_reward"] = sum(rs) / len(rs)
    for key, vs in values.items():
        out[key] = sum(vs) / len(vs)
    for kind, ls in lengths.items():
        out[f"len_{kind}"] = sum(ls) / len(ls)
    groups = scored.groups
    out.update(
        groups=float(len(groups)),
        filtered_groups=float(sum(not k for k in groups.values())),
        kept_rollouts=float(sum(scored.kept)),
        memory_cap_hits=float(cap_hits),
        memory_cap_rate=cap_hits / memory_turns if memory_turns else 0.0,
        tokens_generated=float(tokens),
    )
    return out


def build_policy(config: Config, device: str, resume_from: Path | None) -> tuple[Any, Any]:
    """The trainable policy (resumed weights when resuming) and the frozen reference for the KL term.

    Reference: None with LoRA (the base model with adapters disabled) or without KL; otherwise a frozen copy
    of the INITIAL weights (``model.name``), also when resuming. Trainable weights are float32 whatever
    ``model.dtype`` says for ``auto`` (AdamW steps of lr 1e-6 vanish in bf16); ``model.compute_dtype`` is
    attached to the policy and the reference alike, so training, the KL reference and the HF engine all
    autocast to it (``memtrain.precision``).
    """
    from memtrain.models import load_policy
    from memtrain.precision import resolve_compute_dtype, set_compute_dtype

    dtype = "float32" if config.model.dtype == "auto" else config.model.dtype
    lora = config.model.lora
    full_resume = resume_from is not None and lora is None
    model = load_policy(str(resume_from) if full_resume else config.model.name, dtype, device)
    ref = None
    if config.rl.kl_coef > 0 and lora is None:
        ref = load_policy(config.model.name, dtype, device) if full_resume else copy.deepcopy(model)
        ref.eval()
        ref.requires_grad_(False)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora is not None:
            model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora)
        if resume_from is not None:
            ckpt_io.load_adapter_weights(model, resume_from)
    compute = resolve_compute_dtype(config.model.compute_dtype, device)
    for m in (model, ref):
        if m is not None:
            set_compute_dtype(m, compute)
    logger.info("compute dtype %s (model.compute_dtype=%s on %s); weights %s", str(compute).split(".")[-1],
                config.model.compute_dtype, device, str(next(model.parameters()).dtype).split(".")[-1])
    model.train()
    return model, ref


def check_run_dir(out_dir: Path, config: Config, resume: bool) -> Path | None:
    """Check ``out_dir`` against the run it may hold and return the checkpoint to resume from (or None).

    A fresh run needs an empty/new directory (its lock file aside); ``--resume`` needs the same config up to
    RESUMABLE_KEYS. Writes nothing but removes what a killed checkpoint writer left behind.
    """
    config_path = out_dir / CONFIG_FILE
    holds_run = any((out_dir / m).exists() for m in _RUN_MARKERS)
    if holds_run and not resume:
        raise FileExistsError(
            f"{out_dir} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    if out_dir.is_dir() and not holds_run and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and is not a memtrain run directory (no {CONFIG_FILE}); "
            "choose a new or empty --out"
        )
    checkpoint = None
    if holds_run:
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing, so {out_dir} cannot be resumed safely")
        diffs = ckpt_io.config_differences(load_config(config_path), config)
        if diffs:
            raise ValueError(
                f"cannot resume {out_dir}: the config differs from the run's in "
                f"{'; '.join(diffs)}. Only {', '.join(sorted(ckpt_io.RESUMABLE_KEYS))} may change "
                "on resume; start a new run (another --out) for a different config"
            )
        ckpt_io.remove_partial_checkpoints(out_dir)
        # newest complete step_* dir, even when `latest` was lost in a copy; refuses to restart over history
        # the cadence the logged steps ran with (the run's config), not the one asked for now
        checkpoint = ckpt_io.resume_checkpoint(out_dir, load_config(config_path).train.checkpoint_every)
    return checkpoint


def write_run_config(out_dir: Path, config: Config) -> None:
    """The (possibly updated, e.g. more steps) resolved config: what marks ``out_dir`` as a run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)


def _device(config: Config) -> str:
    from memtrain.models import default_device

    device = default_device() if config.model.device == "auto" else config.model.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but torch sees no CUDA device; use model.device=cpu or auto")
    return device


def _check_engine(config: Config) -> None:
    if config.engine.kind == "openai":
        raise ValueError(
            "engine.kind=openai: training with a remote engine requires weight sync after every "
            "update, which memtrain's trainer does not do; use engine.kind=hf (local model) or the "
            "verl backend for multi-GPU training"
        )
    if config.engine.kind != "hf":
        raise ValueError(
            f"engine.kind={config.engine.kind!r}: training needs engine.kind=hf (the engine samples "
            "from the model being trained)"
        )


def _check_parallel(config: Config) -> None:
    if config.train.parallel == "fsdp2" and config.model.lora is not None:
        raise ValueError(
            "train.parallel=fsdp2 with model.lora: sharding is for full fine-tuning of models that do not "
            "fit one device; LoRA adapters are small, so use train.parallel=ddp (every rank holds the model)"
        )


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


def collect_rollouts(task: Task, rows: list[dict], engine: Engine, config: Config, step: int,
                     position: int, ctx: DistContext | None = None) -> RolloutBatch:
    """Roll out ``train.batch_size`` rows from ``position``; with ``rl.fill_filtered_batches``, roll out more
    rows (up to ``train.fill_max_rounds`` rounds) until ``batch_size`` row groups survive the DAPO filter.
    Data-parallel (``ctx``): this rank rolls out its share of the rows; the refill count is global."""
    ctx = ctx or DistContext()
    rollouts: list[Rollout] = []
    counters: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = {}
    rounds = samples = 0
    need = config.train.batch_size
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
        need = config.train.batch_size - int(ctx.sum_values({"kept": primary_groups_kept(scored)})["kept"])
        refill = config.rl.fill_filtered_batches and config.rl.dynamic_filter
        if not (refill and need > 0 and rounds < config.train.fill_max_rounds):
            return RolloutBatch(scored, dict(counters), position, samples, rounds)


def sample_records(scored: Scored, count: int) -> list[dict[str, Any]]:
    """Readable records of the first ``count`` row-level rollouts (not IMR answers) for samples.jsonl."""
    out = []
    for r, adv, kept in zip(scored.rollouts, scored.advantages, scored.kept, strict=True):
        if r.kind != "imr" and len(out) < count:
            out.append({"group": r.group, "kind": r.kind, "advantage": adv, "kept": kept, **r.record})
    return out


def progress_line(row: dict[str, Any], steps: int) -> str:
    def f(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    skipped = " - SKIPPED (non-finite loss/gradients)" if row.get("skipped_nonfinite") == 1.0 else ""
    return (f"step {row['step']}/{steps}: e2e_reward {f('e2e_reward')}, e2e_match {f('e2e_match')}, "
            f"imr_match {f('imr_match')}, kl {f('kl')}, loss {f('loss')}, "
            f"filtered {f('filtered_groups')}/{f('groups')} groups, "
            f"{f('tokens_generated')} tokens, {f('step_time_s')}s (rollout {f('time_rollout_s')}s, update "
            f"{f('time_update_s')}s){skipped}")


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------


def train(config: Config, out_dir: Path, resume: bool = False) -> Path:
    """Train ``config`` into ``out_dir`` (or continue the run there with ``resume``); returns ``out_dir``.

    Nothing is written before the data, the tokenizer and (after the run-directory checks) the model have
    loaded, so a failed start can be rerun as it was; the directory is locked while the run lasts.
    """
    from memtrain.data.dataset import load_rows
    from memtrain.models import load_tokenizer

    out_dir = Path(out_dir)
    cfg_t = config.train
    _check_engine(config)
    _check_parallel(config)
    check_trainable_sampling(config.rl)  # rl.top_p < 1 cannot be trained on exactly
    if not config.data.path:
        raise ValueError(
            "data.path is empty: set it to a dataset directory built by `memtrain data ...` "
            "(e.g. data.path=runs/demo-data)"
        )
    threads = set_threads(cfg_t.threads)
    ctx = init_from_env(_device(config), cfg_t.parallel)  # torchrun data parallel (memtrain.rl.distributed)

    # --- inputs first: bad data or a bad tokenizer fail here, before the run directory is touched ----------
    tokenizer = load_tokenizer(config.model.name)
    task = make_task(config, tokenizer)
    rows = load_rows(config.data.path)
    check_rows(task, rows, config.data.path)

    # --- one writer per run directory: rank 0 holds its lock until the run ends (released by the kernel if
    # the process dies), so a second trainer on the same --out is refused before it writes anything
    ctx.on_main(lambda: acquire_dir_lock(out_dir))
    try:
        return _train_locked(config, out_dir, resume, ctx, threads, tokenizer, task, rows)
    finally:
        if ctx.is_main:
            release_dir_lock(out_dir)


def _train_locked(config: Config, out_dir: Path, resume: bool, ctx: DistContext, threads: int, tokenizer: Any,
                  task: Task, rows: list[dict]) -> Path:
    """``train`` once the inputs are checked and the run directory is locked."""
    from memtrain.engines.factory import make_engine

    cfg_t = config.train
    # --- run directory: fresh, or resumed from its latest checkpoint (rank 0 checks, the others follow) ----
    resume_from = ctx.on_main(lambda: check_run_dir(out_dir, config, resume))
    state = ckpt_io.load_trainer_state(resume_from) if resume_from is not None else None
    start_step = int(state["step"]) if state else 0
    fingerprint = ckpt_io.config_fingerprint(config)
    if state and state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"cannot resume from {resume_from}: its config fingerprint {state.get('fingerprint')} "
            f"differs from this config's {fingerprint} (was {out_dir / CONFIG_FILE} edited?)"
        )
    if start_step >= cfg_t.steps:
        ctx.on_main(lambda: write_run_config(out_dir, config))
        logger.info(
            "%s: already at step %d of %d; nothing to do (raise train.steps to continue)",
            out_dir,
            start_step,
            cfg_t.steps,
        )
        return out_dir

    # --- seeds -------------------------------------------------------------------------------------------
    random.seed(cfg_t.seed)
    np.random.seed(cfg_t.seed % 2**32)
    torch.manual_seed(cfg_t.seed)

    # --- policy, reference, optimizer, schedule (+ their states when resuming) -----------------------------
    device = _device(config)
    model, ref = build_policy(config, device, resume_from)  # a bad model fails here, before config.yaml
    ctx.on_main(lambda: write_run_config(out_dir, config))
    ctx.broadcast_parameters(model)
    if ctx.fsdp:  # FSDP2: shard the policy (and the frozen reference) before the optimizer sees it
        shard_model(model, ctx)
        if ref is not None:
            shard_model(ref, ctx, frozen=True)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps)
    position, streak = 0, 0
    if state is not None:
        if ctx.fsdp:
            ckpt_io.load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt_io.set_rng_state(state["rng"])
        position, streak = int(state["data_position"]), int(state["nonfinite_streak"])
        del state  # not kept for the run: on GPUs / FSDP2 its optimizer state is a second, full copy
    engine = make_engine(config.engine, config.model.name, model=model, tokenizer=tokenizer)
    log = RunLogger(out_dir, start_step, tensorboard=cfg_t.tensorboard) if ctx.is_main else NullRunLogger()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "train %s: task=%s, %d rows, %s on %s (%d threads), %.1fM trainable parameters, steps %d..%d",
        out_dir,
        task.name,
        len(rows),
        config.model.name,
        device,
        threads,
        n_train / 1e6,
        start_step + 1,
        cfg_t.steps,
    )

    try:
        for step in range(start_step + 1, cfg_t.steps + 1):
            t_step = time.perf_counter()

            # 1-3. rollouts, advantages, DAPO filter (+ refill rounds)
            with gathered_for_rollout(model):  # FSDP2: full weights for generation (else a no-op)
                batch = collect_rollouts(task, rows, engine, config, step, position, ctx)
            position = batch.position
            time_rollout = time.perf_counter() - t_step

            # 4. one policy update on every turn of the kept rollouts
            t_update = time.perf_counter()
            seqs = training_sequences(batch.scored)
            try:
                stats = policy_update(model, optimizer, seqs, config.rl, ref=ref, scheduler=scheduler,
                                      grad_clip=config.optim.grad_clip, dp=ctx if ctx.enabled else None)
            except NonFiniteParamsError as exc:  # weights not restorable: stop before they are saved
                last = ckpt_io.latest_checkpoint(out_dir)
                raise NonFiniteError(f"step {step}: {exc}. Last good checkpoint: "
                                     f"{last if last is not None else 'none yet'}") from exc
            stats = reduce_update_stats(stats, ctx)  # data-parallel: over ranks (else unchanged)
            scored = gather_scored(batch.scored, ctx)  # data-parallel: every rank's rollouts (else unchanged)
            time_update = time.perf_counter() - t_update
            skipped = stats.get("skipped_nonfinite", 0.0) == 1.0
            streak = streak + 1 if skipped else 0

            # 5. log, samples, checkpoint
            row = log.log_step({
                "step": step, **step_metrics(scored, ctx.sum_values(batch.counters)), **stats,
                "reward_metric": task.reward_metric, "samples": batch.samples, "rollout_rounds": batch.rounds,
                "data_position": position, "time_rollout_s": time_rollout, "time_update_s": time_update,
                "step_time_s": time.perf_counter() - t_step,
            })
            if step % cfg_t.log_every == 0 or step == cfg_t.steps or skipped:
                logger.info(progress_line(row, cfg_t.steps))
            if step % cfg_t.sample_every == 0 or step == 1:
                log.log_samples(step, sample_records(scored, cfg_t.sample_count))
            if streak >= cfg_t.max_nonfinite:
                last = ckpt_io.latest_checkpoint(out_dir)
                raise NonFiniteError(
                    f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient norm "
                    f"and were skipped; stopping. The model was not changed by them. Last good checkpoint: "
                    f"{last if last is not None else 'none yet'}. Lower optim.lr or check the data, then "
                    "resume with --resume")
            if (step % cfg_t.checkpoint_every == 0 or step == cfg_t.steps) and not skipped:
                saved = {"data_position": position, "nonfinite_streak": streak, "fingerprint": fingerprint}
                weights, optim_state = None, None
                if ctx.fsdp:  # every rank joins gathering the full state dicts onto rank 0
                    weights, optim_state = ckpt_io.gather_full_state(model, optimizer)
                path = ctx.on_main(partial(  # rank 0 writes, the others wait for it
                    ckpt_io.save_checkpoint, out_dir, step, model, tokenizer, optimizer, scheduler, saved,
                    keep_last=cfg_t.keep_last, model_name=config.model.name, model_state=weights,
                    optimizer_state=optim_state))
                logger.info("checkpoint %s", path)
    finally:
        log.close()
    return out_dir
