"""``memtrain train``: the GRPO training loop, as a recipe - :func:`setup_run`, then :func:`train_step` per
step with checkpoints, then :func:`close_run` (:func:`train` is exactly that).

Per step (docs/method.md section 4):

1. draw ``train.batch_size`` rows (deterministic order from the seed, reshuffled every epoch);
2. roll out the task (``memtrain.rl.tasks``): G1 memory-agent trajectories per row, plus the IMR groups of
   the proxy task, with an engine that follows the policy being trained (``engine.sync_weights``: the HF
   engine samples from the very model, a vLLM engine reloads its weights after every update);
3. Dr. GRPO advantages within each group, DAPO filter (groups whose rewards are all equal are dropped;
   with ``rl.fill_filtered_batches`` more rows are rolled out until enough row groups survive)
   (``memtrain.rl.rollout``);
4. one training sequence per turn (prompt + completion as sampled, the rollout's advantage broadcast), and
   exactly one optimizer step (``memtrain.rl.update.policy_update``), then the engine synced to it;
5. log a metrics row, sample trajectories every ``train.sample_every`` steps, a checkpoint every
   ``train.checkpoint_every`` steps and at the end (never right after a skipped step, so the newest
   checkpoint always follows a real update);
6. with ``train.eval_data``: validate - evaluate the policy greedily on that held-out set with the training
   engine (the evaluation registered under the task's name) before the first step, every
   ``train.eval_every`` steps and after the last, into ``RUN_DIR/eval/step_N`` (:func:`validate`).

Determinism: every random draw of a step (rollout sampling seeds, IMR choices) derives from
``(train.seed, step, round)``, the data order from ``(train.seed, epoch)``; with the optimizer, scheduler and
RNG states in the checkpoint, a resumed run repeats exactly the steps an uninterrupted one would take.
Non-finite loss or gradients skip the step (no parameter change), and so does a step that made a weight
non-finite (undone from a copy, ``memtrain.rl.optim.SNAPSHOT_MAX_BYTES``); ``train.max_nonfinite`` in a row
stop the run with :class:`NonFiniteError`, leaving the last checkpoint as it was.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtrain.config import Config, TrainConfig, load_config, save_config
from memtrain.data.dataset import dataset_fingerprint, load_rows, overlap_reason
from memtrain.engines.base import Engine, can_follow_policy
from memtrain.engines.factory import make_engine
from memtrain.errors import UserError
from memtrain.eval.registry import Validator, get_eval
from memtrain.io import LOCK_FILE, acquire_dir_lock, release_dir_lock
from memtrain.log import logger
from memtrain.models import default_device, load_policy, load_tokenizer
from memtrain.precision import resolve_compute_dtype, set_compute_dtype
from memtrain.rl import checkpoint as ckpt_io
from memtrain.rl.collect import collect_rollouts
from memtrain.rl.distributed import (
    DistContext,
    NullRunLogger,
    gather_scored,
    gathered_for_rollout,
    init_from_env,
    reduce_update_stats,
    shard_model,
)
from memtrain.rl.metrics import (
    COLLAPSE_FLAGS,
    EVAL_DIR,
    RunLogger,
    collapse_flags,
    drop_validations_after,
    start_wandb,
    validation_line,
)
from memtrain.rl.optim import NonFiniteParamsError, apply_lora, build_optimizer, build_scheduler
from memtrain.rl.rollout import (
    Task,
    TrainSequence,
    sample_records,
    step_metrics,
    training_sequences,
)
from memtrain.rl.tasks.registry import check_rows, make_task
from memtrain.rl.update import check_trainable_sampling, policy_update

CONFIG_FILE = "config.yaml"
_RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", ckpt_io.CHECKPOINTS_DIR)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the run stopped."""


# --------------------------------------------------------------------------------------------------------
# Pieces of the loop (pure or nearly so)
# --------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """torch CPU threads: the config value, else $MEMTRAIN_THREADS, else every core."""
    if threads is None:
        env = os.environ.get("MEMTRAIN_THREADS")
        if env:
            if not env.isdigit() or int(env) < 1:
                raise UserError(f"MEMTRAIN_THREADS={env!r}: expected a positive integer")
            threads = int(env)
        else:
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def build_policy(config: Config, device: str, resume_from: Path | None) -> tuple[Any, Any]:
    """The trainable policy (resumed weights when resuming) and the frozen reference for the KL term.

    Reference: None with LoRA (the base model with adapters disabled) or without KL; otherwise a frozen copy
    of the INITIAL weights (``model.name``), also when resuming. Trainable weights are float32 whatever
    ``model.dtype`` says for ``auto`` (AdamW steps of lr 1e-6 vanish in bf16); ``model.compute_dtype`` is
    attached to the policy and the reference alike, so training, the KL reference and the HF engine all
    autocast to it (``memtrain.precision``).
    """

    dtype = "float32" if config.model.dtype == "auto" else config.model.dtype
    lora = config.model.lora
    # a sharded checkpoint is loaded into the model once it is built and sharded (_restore)
    full_resume = resume_from is not None and lora is None and not ckpt_io.is_sharded(resume_from)
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


def policy_engine(config: Config, model: Any, tokenizer: Any) -> Engine:
    """The rollout engine, refused unless it can follow the policy as it trains (``sync_weights``)."""

    engine = make_engine(config.engine, config.model.name, model=model, tokenizer=tokenizer)
    if not can_follow_policy(engine):
        raise UserError(f"engine.kind={config.engine.kind}: this engine cannot follow the policy being "
                        "trained (it has no sync_weights), so every rollout after the first update would "
                        "sample stale weights; train with an engine that syncs (e.g. engine.kind=hf, the "
                        "local model) or with the verl backend for multi-GPU training")
    return engine


def sync_engine(engine: Any, model: Any) -> dict[str, float]:
    """Bring the engine to the policy's current weights; its numbers plus ``time_sync_s``."""
    start = time.perf_counter()
    stats = engine.sync_weights(model)
    return {**stats, "time_sync_s": time.perf_counter() - start}


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
    if not holds_run:
        return None
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing, so {out_dir} cannot be resumed safely")
    diffs = ckpt_io.config_differences(load_config(config_path), config)
    if diffs:
        raise UserError(
            f"cannot resume {out_dir}: the config differs from the run's in "
            f"{'; '.join(diffs)}. Only {', '.join(sorted(ckpt_io.RESUMABLE_KEYS))} may change "
            "on resume; start a new run (another --out) for a different config"
        )
    ckpt_io.remove_partial_checkpoints(out_dir)
    # newest complete step_* dir, even when `latest` was lost in a copy; refuses to restart over history
    # the cadence the logged steps ran with (the run's config), not the one asked for now
    return ckpt_io.resume_checkpoint(out_dir, load_config(config_path).train.checkpoint_every)


def resume_state(resume_from: Path | None, config: Config, out_dir: Path,
                 data_fingerprint: str | None = None) -> dict[str, Any] | None:
    """The trainer state saved with ``resume_from`` (None for a fresh run), checked against ``config`` and
    the content of its training set (``data_fingerprint``: checkpoints written before it was saved pass)."""
    if resume_from is None:
        return None
    state = ckpt_io.load_trainer_state(resume_from)
    fingerprint = ckpt_io.config_fingerprint(config)
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            f"cannot resume from {resume_from}: its config fingerprint {state.get('fingerprint')} "
            f"differs from this config's {fingerprint} (was {out_dir / CONFIG_FILE} edited?)"
        )
    saved = state.get("data_fingerprint")
    if data_fingerprint is not None and saved is not None and saved != data_fingerprint:
        raise UserError(
            f"cannot resume from {resume_from}: it trained on a dataset with fingerprint {saved}, but "
            f"data.path={config.data.path} now holds {data_fingerprint} (rebuilt or replaced); restore that "
            "dataset, or start a new run with another --out"
        )
    return state


def write_run_config(out_dir: Path, config: Config) -> None:
    """The (possibly updated, e.g. more steps) resolved config: what marks ``out_dir`` as a run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)


def _device(config: Config) -> str:

    device = default_device() if config.model.device == "auto" else config.model.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but torch sees no CUDA device; use model.device=cpu or auto")
    return device


def check_settings(config: Config) -> None:
    """Settings the trainer refuses before anything loads."""
    if config.train.parallel == "fsdp2" and config.model.lora is not None:
        raise UserError(
            "train.parallel=fsdp2 with model.lora: sharding is for full fine-tuning of models that do not "
            "fit one device; LoRA adapters are small, so use train.parallel=ddp (every rank holds the model)"
        )
    if config.train.checkpoint_format == "sharded" and config.model.lora is not None:
        raise UserError("train.checkpoint_format=sharded with model.lora: a LoRA checkpoint is the small "
                        "adapter alone; use train.checkpoint_format=full (or auto)")
    check_trainable_sampling(config.rl)  # rl.top_p < 1 cannot be trained on exactly
    if not config.data.path:
        raise UserError(
            "data.path is empty: set it to a dataset directory built by `memtrain data ...` "
            "(e.g. data.path=runs/demo-data)"
        )


def find_validator(config: Config) -> Validator | None:
    """The validation function of ``train.eval_data`` (None without it): the ``validate`` of the evaluation
    ``train.eval`` names, by default the one registered under ``train.task``'s name
    (:mod:`memtrain.eval.registry`)."""
    if not config.train.eval_data:
        return None
    evaluation = get_eval(config.train.eval or config.train.task)  # an unknown name: a one-line UserError
    if evaluation.validate is None:
        raise UserError(f"train.eval_data={config.train.eval_data!r}: the {evaluation.name!r} evaluation "
                        "cannot validate during training (no validate function); evaluate the checkpoints "
                        f"with `memtrain eval {evaluation.name}` instead")
    return evaluation.validate


def validation_due(cfg: TrainConfig, step: int) -> bool:
    """Validate before the first step (step 0), every ``train.eval_every`` steps, and after the last."""
    every = cfg.eval_every > 0 and step % cfg.eval_every == 0
    return bool(cfg.eval_data) and (step in (0, cfg.steps) or every)


def progress_line(row: dict[str, Any], steps: int) -> str:
    def f(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    skipped = ""
    if row.get("skipped_nonfinite") == 1.0:
        exploded = row.get("skipped_exploded") == 1.0
        skipped = (" - SKIPPED (the update exploded: optim.max_update_ratio)" if exploded
                   else " - SKIPPED (non-finite loss/gradients)")
    return (f"step {row['step']}/{steps}: e2e_reward {f('e2e_reward')}, e2e_match {f('e2e_match')}, "
            f"imr_match {f('imr_match')}, kl {f('kl')}, loss {f('loss')}, "
            f"kept {f('kept_groups')}/{f('groups')} groups, caps mem {f('memory_cap_rate')} ans "
            f"{f('answer_cap_rate')}, "
            f"{f('tokens_generated')} tokens, {f('step_time_s')}s (rollout {f('time_rollout_s')}s, update "
            f"{f('time_update_s')}s){skipped}")


def _last_good(out_dir: Path) -> str:
    last = ckpt_io.latest_checkpoint(out_dir)
    return str(last) if last is not None else "none yet"


# --------------------------------------------------------------------------------------------------------
# A run: set up, one step, checkpoints, cleanup
# --------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a training run holds between steps: what :func:`setup_run` builds and :func:`train_step`
    advances (``position``, ``streak``)."""

    config: Config
    out_dir: Path
    ctx: DistContext
    tokenizer: Any
    task: Task
    rows: list[dict]
    model: Any
    ref: Any  # the frozen KL reference (None: LoRA's base model, or no KL term)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: Any  # an Engine that follows the policy (engines.base.PolicyFollower)
    validator: Validator | None  # evaluates the policy on train.eval_data (None: no validation)
    log: RunLogger | NullRunLogger
    fingerprint: str  # of the config, saved with every checkpoint and checked on resume
    data_fingerprint: str  # of data.path's content (its manifest's shard hashes), likewise
    start_step: int  # the last step taken before this process (0: a fresh run)
    position: int = 0  # data stream position: rows drawn so far
    streak: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    recent: list[dict[str, Any]] = field(default_factory=list)  # the last rows, for collapse_flags


def setup_run(config: Config, out_dir: Path, resume: bool = False) -> Run | None:
    """Check the inputs, lock ``out_dir`` and build the run (from its latest checkpoint with ``resume``).

    Returns None, with the lock released, when the run there already took ``train.steps`` steps. Nothing is
    written before the data, the tokenizer, the model and the engine have loaded (the lock file aside), so a
    failed start can be rerun as it was; the lock is held until :func:`close_run`.
    """

    out_dir = Path(out_dir)
    check_settings(config)
    threads = set_threads(config.train.threads)
    ctx = init_from_env(_device(config), config.train.parallel)  # torchrun data parallel (rl.distributed)
    # inputs first: bad data or a bad tokenizer fail here, before the run directory is touched
    tokenizer = load_tokenizer(config.model.name)
    task = make_task(config, tokenizer)
    rows = load_rows(config.data.path)
    check_rows(task, rows, config.data.path)
    validator = find_validator(config)
    if validator is not None:
        if ctx.enabled:
            raise UserError("train.eval_data: validation during training runs in a single process; under "
                            "torchrun evaluate the checkpoints with `memtrain eval` instead")
        held_out = load_rows(config.train.eval_data)  # a missing or unreadable set fails before any write
        overlap = overlap_reason(rows, held_out)
        if overlap and not config.train.allow_eval_overlap:
            raise UserError(f"train.eval_data={config.train.eval_data} is not held out from data.path="
                            f"{config.data.path}: {overlap}; build it with `memtrain data ... --exclude-from "
                            f"{config.data.path}` (or set train.allow_eval_overlap=true)")
    # one writer per run directory: rank 0 holds its lock until the run ends (released by the kernel if the
    # process dies), so a second trainer on the same --out is refused before it writes anything
    ctx.on_main(lambda: acquire_dir_lock(out_dir))
    try:
        run = _open_run(config, out_dir, resume, ctx, tokenizer, task, rows, validator)
    except BaseException:
        _release_lock(run_dir=out_dir, ctx=ctx)
        raise
    if run is None:
        _release_lock(run_dir=out_dir, ctx=ctx)
        return None
    n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    logger.info("train %s: task=%s, %d rows, %s on %s (%d threads), %.1fM trainable parameters, steps %d..%d",
                out_dir, task.name, len(rows), config.model.name, _device(config), threads, n_train / 1e6,
                run.start_step + 1, config.train.steps)
    return run


def _open_run(config: Config, out_dir: Path, resume: bool, ctx: DistContext, tokenizer: Any, task: Task,
              rows: list[dict], validator: Validator | None) -> Run | None:
    """``setup_run`` once the inputs are checked and the run directory is locked."""
    # run directory: fresh, or resumed from its latest checkpoint (rank 0 checks, the others follow)
    resume_from = ctx.on_main(lambda: check_run_dir(out_dir, config, resume))
    data_fingerprint = dataset_fingerprint(config.data.path)
    state = resume_state(resume_from, config, out_dir, data_fingerprint)
    start_step = int(state["step"]) if state else 0
    if start_step >= config.train.steps:
        ctx.on_main(lambda: write_run_config(out_dir, config))
        logger.info("%s: already at step %d of %d; nothing to do (raise train.steps to continue)", out_dir,
                    start_step, config.train.steps)
        return None
    _seed_everything(config.train.seed)
    model, ref = build_policy(config, _device(config), resume_from)  # a bad model fails before config.yaml
    engine = policy_engine(config, model, tokenizer)  # and so does an engine that cannot follow the policy
    ctx.on_main(lambda: write_run_config(out_dir, config))
    ctx.broadcast_parameters(model)
    if ctx.fsdp:  # FSDP2: shard the policy (and the frozen reference) before the optimizer sees it
        shard_model(model, ctx)
        if ref is not None:
            shard_model(ref, ctx, frozen=True)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps)
    position, streak = _restore(state, resume_from, ctx, model, optimizer, scheduler)
    del state  # not kept for the run: on GPUs / FSDP2 its optimizer state is a second, full copy
    log: RunLogger | NullRunLogger = NullRunLogger()
    if ctx.is_main:
        cfg = config.train
        wandb = (start_wandb(out_dir, cfg.wandb_project, cfg.wandb_mode, config.model_dump(mode="json"))
                 if cfg.wandb else None)
        log = RunLogger(out_dir, start_step, tensorboard=cfg.tensorboard, wandb=wandb)
        drop_validations_after(out_dir, start_step)  # a killed run's later validations are redone
    synced = sync_engine(engine, model)  # the first rollout samples from exactly these weights
    logger.debug("engine synced to the policy: %s", synced)
    return Run(config, out_dir, ctx, tokenizer, task, rows, model, ref, optimizer, scheduler, engine,
               validator, log, ckpt_io.config_fingerprint(config), data_fingerprint, start_step, position,
               streak)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _restore(state: dict[str, Any] | None, resume_from: Path | None, ctx: DistContext, model: Any,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, int]:
    """Load a checkpoint's optimizer, scheduler and RNG states (and a sharded checkpoint's weights, on any
    number of ranks); returns (data position, non-finite streak)."""
    if state is None or resume_from is None:
        return 0, 0
    if ckpt_io.is_sharded(resume_from):
        ckpt_io.load_sharded_state(resume_from, model, optimizer)
    elif ctx.fsdp:
        ckpt_io.load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt_io.set_rng_state(state["rng"])
    return int(state["data_position"]), int(state["nonfinite_streak"])


def _release_lock(run_dir: Path, ctx: DistContext) -> None:
    if ctx.is_main:
        release_dir_lock(run_dir)


def train_step(run: Run, step: int) -> dict[str, Any]:
    """Step ``step`` (1-5 of the module docstring but the checkpoint); returns its metrics row as logged."""
    cfg = run.config.train
    t_step = time.perf_counter()
    with gathered_for_rollout(run.model):  # FSDP2: full weights for generation (else a no-op)
        batch = collect_rollouts(run.task, run.rows, run.engine, run.config, step, run.position, run.ctx)
    run.position = batch.position
    release = getattr(run.engine, "release_memory", None)
    if callable(release):  # an engine sharing the GPU with the trainer frees it for the update (vLLM sleep)
        release()
    time_rollout = time.perf_counter() - t_step
    t_update = time.perf_counter()
    stats = update_policy(run, step, training_sequences(batch.scored))
    time_update = time.perf_counter() - t_update
    skipped = stats.get("skipped_nonfinite", 0.0) == 1.0
    run.streak = run.streak + 1 if skipped else 0
    stepped = not skipped and stats.get("skipped_empty", 0.0) != 1.0  # the weights changed
    synced = sync_engine(run.engine, run.model) if stepped else {"time_sync_s": 0.0}
    scored = gather_scored(batch.scored, run.ctx)  # data-parallel: every rank's rollouts (else unchanged)
    metrics = {
        "step": step, **step_metrics(scored, run.ctx.sum_values(batch.counters)), **stats, **synced,
        "reward_metric": run.task.reward_metric, "samples": batch.samples, "rollout_rounds": batch.rounds,
        "data_position": run.position, "time_rollout_s": time_rollout, "time_update_s": time_update,
        "step_time_s": time.perf_counter() - t_step,
    }
    run.recent = [*run.recent, metrics][-cfg.collapse_patience:]
    flags = collapse_flags(run.recent, cfg.collapse_patience)
    row = run.log.log_step({**metrics, **flags})
    if step % cfg.log_every == 0 or step == cfg.steps or skipped:
        logger.info(progress_line(row, cfg.steps))
    for flag in flags:
        logger.warning("step %d: %s (%s)", step, COLLAPSE_FLAGS[flag],
                       f"{cfg.collapse_patience} steps" if flag == "warn_no_signal" else flag)
    if step % cfg.sample_every == 0 or step == 1:
        run.log.log_samples(step, sample_records(scored, cfg.sample_count))
    return row


def update_policy(run: Run, step: int, seqs: list[TrainSequence]) -> dict[str, Any]:
    """Exactly one optimizer step on ``seqs``; its statistics combined over the ranks."""
    try:
        stats = policy_update(run.model, run.optimizer, seqs, run.config.rl, ref=run.ref,
                              scheduler=run.scheduler, grad_clip=run.config.optim.grad_clip,
                              dp=run.ctx if run.ctx.enabled else None,
                              max_update_ratio=run.config.optim.max_update_ratio)
    except NonFiniteParamsError as exc:  # weights not restorable: stop before they are saved
        raise NonFiniteError(f"step {step}: {exc}. Last good checkpoint: {_last_good(run.out_dir)}") from exc
    return reduce_update_stats(stats, run.ctx)  # data-parallel: over ranks (else unchanged)


def validate(run: Run, step: int) -> Any:
    """Evaluate the policy after ``step`` (0: the initial model) on ``train.eval_data`` into
    ``RUN_DIR/eval/step_N``: greedy, with the training engine (synced to the policy), resumable like any eval
    (a validation killed half-way continues from its records). Returns the evaluation's summary."""
    cfg = run.config.train
    if run.validator is None:
        raise ValueError("validate: this run has no train.eval_data")
    out = run.out_dir / EVAL_DIR / ckpt_io.step_dir_name(step)
    start = time.perf_counter()
    model_id = {"name": run.config.model.name, "run": str(Path(run.out_dir).resolve()), "step": step,
                "fingerprint": run.fingerprint}
    summary = run.validator(run.config, cfg.eval_data, out, limit=cfg.eval_limit,
                            batch_size=cfg.eval_batch_size, engine=run.engine, tokenizer=run.tokenizer,
                            model_id=model_id)
    run.log.log_validation(step, summary)
    logger.info("validation after step %d: %s (%.0fs; %s)", step,
                validation_line(summary, run.task.reward_metric), time.perf_counter() - start, out)
    return summary


def check_nonfinite_streak(run: Run, step: int) -> None:
    """Stop the run after ``train.max_nonfinite`` skipped steps in a row (the weights were not changed)."""
    if run.streak >= run.config.train.max_nonfinite:
        raise NonFiniteError(
            f"{run.streak} consecutive steps (up to step {step}) had a non-finite loss or gradient norm, or "
            "an update above optim.max_update_ratio, and were skipped; stopping. The model was not changed "
            "by them. Last good checkpoint: "
            f"{_last_good(run.out_dir)}. Lower optim.lr or check the data, then resume with --resume")


def checkpoint_due(cfg: TrainConfig, step: int, row: dict[str, Any]) -> bool:
    """Every ``train.checkpoint_every`` steps (but not right after a skipped step: the previous checkpoint
    holds the same weights) and always after the last step, skipped or not, so that the updates since the
    last checkpoint are saved and the final weights are those the last validation saw."""
    return step == cfg.steps or (step % cfg.checkpoint_every == 0 and row.get("skipped_nonfinite") != 1.0)


def checkpoint_format(config: Config, ctx: DistContext) -> str:
    """``train.checkpoint_format`` resolved: auto = sharded under FSDP2, else full."""
    fmt = config.train.checkpoint_format
    return ("sharded" if ctx.fsdp else "full") if fmt == "auto" else fmt


def save_checkpoint(run: Run, step: int) -> None:
    """The model, optimizer, scheduler, RNG and data position after ``step``: rank 0 writes a full checkpoint;
    every rank writes its shards of a sharded one, rank 0 the rest."""
    cfg = run.config
    saved = {"data_position": run.position, "nonfinite_streak": run.streak, "fingerprint": run.fingerprint,
             "data_fingerprint": run.data_fingerprint}
    if checkpoint_format(cfg, run.ctx) == "sharded":
        tmp = run.ctx.on_main(partial(ckpt_io.begin_sharded_checkpoint, run.out_dir, step))
        ckpt_io.save_sharded_state(run.model, run.optimizer, tmp)  # every rank, its own shards
        path = run.ctx.on_main(partial(
            ckpt_io.end_sharded_checkpoint, tmp, run.out_dir, step, run.model, run.tokenizer, run.scheduler,
            saved, keep_last=cfg.train.keep_last, model_name=cfg.model.name))
        logger.info("checkpoint %s (sharded)", path)
        return
    weights, optim_state = None, None
    if run.ctx.fsdp:  # every rank joins gathering the full state dicts onto rank 0
        weights, optim_state = ckpt_io.gather_full_state(run.model, run.optimizer)
    path = run.ctx.on_main(partial(  # rank 0 writes, the others wait for it
        ckpt_io.save_checkpoint, run.out_dir, step, run.model, run.tokenizer, run.optimizer, run.scheduler,
        saved, keep_last=cfg.train.keep_last, model_name=cfg.model.name, model_state=weights,
        optimizer_state=optim_state))
    logger.info("checkpoint %s", path)


def close_run(run: Run) -> None:
    """Close the logs and release the run directory's lock."""
    try:
        run.log.close()
    finally:
        _release_lock(run_dir=run.out_dir, ctx=run.ctx)


def train(config: Config, out_dir: Path, resume: bool = False) -> Path:
    """Train ``config`` into ``out_dir`` (or continue the run there with ``resume``); returns ``out_dir``."""
    run = setup_run(config, out_dir, resume)
    if run is None:
        return Path(out_dir)
    try:
        if validation_due(config.train, run.start_step):  # the initial model, or where a resume starts
            validate(run, run.start_step)
        for step in range(run.start_step + 1, config.train.steps + 1):
            row = train_step(run, step)
            check_nonfinite_streak(run, step)
            if checkpoint_due(config.train, step, row):
                save_checkpoint(run, step)
            if validation_due(config.train, step):
                validate(run, step)
    finally:
        close_run(run)
    return run.out_dir
