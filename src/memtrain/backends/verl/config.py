"""verl's Hydra config rendered from a memtrain :class:`~memtrain.config.Config`.

One memtrain config defines a run for both backends; this module maps each setting to verl 0.9.1's
``ppo_trainer`` schema (the mapping table is in docs/verl.md). The result is a small primary config that
extends verl's packaged ``ppo_trainer`` (``defaults: [ppo_trainer, _self_]`` with verl's config directory on
the Hydra search path), so everything memtrain does not set keeps verl's default, and ``verl.overrides`` can
still reach any key. :func:`compose_verl_config` loads it exactly as ``verl.trainer.main_ppo`` does and runs
verl's own validation, without GPUs or Ray.

Rendering needs no verl; composing/validating does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from memtrain.backends.verl import AGENT_NAME, CONFIG_SECTION, ESTIMATOR_NAME, PLUGIN_MODULE, TRAINER_MODE
from memtrain.config import Config
from memtrain.errors import UserError
from memtrain.rl.rollout import SessionShape
from memtrain.rl.tasks.registry import task_class
from memtrain.rl.update import check_trainable_sampling

CONFIG_NAME = "memtrain_ppo"
AGENT_LOOP_FILE = "agent_loop.yaml"
LOSS_AGG = {"seq_mean_token_mean": "seq-mean-token-mean", "token_mean": "token-mean"}


@dataclass(frozen=True)
class RunPaths:
    """Where a verl run of memtrain keeps its files (all absolute: Ray workers run elsewhere)."""

    out_dir: Path

    @property
    def verl_dir(self) -> Path:
        return self.out_dir / "verl"

    @property
    def train_file(self) -> Path:
        return self.verl_dir / "train.parquet"

    @property
    def config_file(self) -> Path:
        return self.verl_dir / f"{CONFIG_NAME}.yaml"

    @property
    def agent_loop_file(self) -> Path:
        return self.verl_dir / AGENT_LOOP_FILE

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "verl_metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.out_dir / "tensorboard"


def _escape(value: Any) -> Any:
    """Strings with ``${`` would be read as OmegaConf interpolations; escape them (nested)."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def agent_loop_entries(config: Config) -> list[dict[str, Any]]:
    """verl's ``agent_loop_config_path`` content: our loop, built with the whole memtrain config."""
    # _recursive_ false: Hydra resolves (and unescapes) the nested config exactly once, as one node
    return [{"name": AGENT_NAME, "_target_": "memtrain.backends.verl.agent_loop.MemtrainAgentLoop",
             "_recursive_": False, "memtrain_config": _escape(config.model_dump(mode="json"))}]


def check_verl_run(config: Config, num_rows: int) -> SessionShape:
    """Refuse what the verl backend cannot run as asked, naming the setting; returns the task's session
    shape (``train.task``), by which verl sizes its sequences and mini-batches."""
    cfg_rl, cfg_t, cfg_v = config.rl, config.train, config.verl
    check_trainable_sampling(cfg_rl)  # verl's actor cannot reproduce top-p truncation either
    if cfg_rl.loss_agg not in LOSS_AGG:
        raise UserError(f"rl.loss_agg={cfg_rl.loss_agg}: the verl backend offers "
                        f"{', '.join(LOSS_AGG)} (verl's loss_agg_mode has no per-session weighting); use "
                        "one of them or the native trainer")
    if cfg_rl.fill_min_groups is not None:
        raise UserError(f"rl.fill_min_groups={cfg_rl.fill_min_groups}: verl refills whole rows by their "
                        "E2E rewards; leave rl.fill_min_groups unset with the verl backend")
    if cfg_rl.imr_questions != 1:
        raise UserError(f"rl.imr_questions={cfg_rl.imr_questions}: the verl backend asks one IMR question "
                        "per trajectory (the paper); use rl.imr_questions=1 or the native trainer")
    if cfg_rl.imr_credit != "broadcast":
        raise UserError(f"rl.imr_credit={cfg_rl.imr_credit}: per-turn IMR credit is the native trainer's "
                        "(verl's estimator gives one advantage per session); use rl.imr_credit=broadcast")
    if cfg_t.eval_data:
        raise UserError(f"train.eval_data={cfg_t.eval_data!r}: validation during training is the native "
                        "trainer's; with the verl backend evaluate the checkpoints with `memtrain eval`")
    if num_rows < cfg_t.batch_size:
        raise UserError(f"the dataset has {num_rows} rows, fewer than train.batch_size={cfg_t.batch_size}: "
                        "verl drops incomplete batches, so no step could run")
    sessions, gpus = cfg_t.batch_size * cfg_rl.group_size, cfg_v.nnodes * cfg_v.gpus_per_node
    if sessions % gpus:
        raise UserError(f"train.batch_size * rl.group_size = {sessions} sessions must be divisible by the "
                        f"{gpus} GPUs (verl.nnodes * verl.gpus_per_node), verl's data-parallel split")
    shape = task_class(config.train.task).session_shape(config)
    if cfg_v.max_tokens_per_gpu < shape.prompt_tokens + shape.response_tokens:
        raise UserError(f"verl.max_tokens_per_gpu={cfg_v.max_tokens_per_gpu} is below one whole sequence "
                        f"({shape.prompt_tokens} prompt + {shape.response_tokens} response tokens); "
                        "raise it")
    return shape


def render_verl_config(config: Config, paths: RunPaths, model_path: str, num_rows: int,
                       resume: bool = False) -> dict[str, Any]:
    """The primary verl config (a nested dict) for ``config``; ``num_rows`` sizes the epochs."""
    shape = check_verl_run(config, num_rows)
    cfg_rl = config.rl
    # the DAPO filter itself (per E2E group and per IMR group) is memtrain_sync's; verl's filter_groups drops
    # whole rows by their E2E rewards and refills the batch: only the refill of rl.fill_filtered_batches
    refill = cfg_rl.dynamic_filter and cfg_rl.fill_filtered_batches
    env = {"VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE, "TENSORBOARD_DIR": str(paths.tensorboard),
           "VERL_FILE_LOGGER_PATH": str(paths.metrics_file), "TOKENIZERS_PARALLELISM": "true"}
    return {
        "hydra": {"searchpath": ["pkg://verl.trainer.config"]},
        "defaults": ["ppo_trainer", "_self_"],
        "algorithm": {
            "adv_estimator": ESTIMATOR_NAME,
            "norm_adv_by_std_in_grpo": cfg_rl.adv_std_norm,
            "use_kl_in_reward": False,
            "filter_groups": {"enable": refill, "metric": "reward"},
        },
        CONFIG_SECTION: {"dynamic_filter": cfg_rl.dynamic_filter},
        "data": _data(config, paths, shape),
        "actor_rollout_ref": {
            "model": _model(config, model_path),
            "actor": _actor(config, shape),
            "ref": {"fsdp_config": {"param_offload": config.verl.param_offload}},
            "rollout": _rollout(config, paths, shape),
        },
        "critic": {"enable": False},
        "trainer": _trainer(config, paths, num_rows, resume),
        "ray_kwargs": {"ray_init": {"runtime_env": {"env_vars": env}}},
    }


def _data(config: Config, paths: RunPaths, shape: SessionShape) -> dict[str, Any]:
    return {
        "train_files": [str(paths.train_file)],
        "val_files": [str(paths.train_file)],  # required by verl; validation is off (test_freq -1)
        "prompt_key": "prompt",
        "max_prompt_length": shape.prompt_tokens,
        "max_response_length": shape.response_tokens,
        "train_batch_size": config.train.batch_size,
        "shuffle": config.data.shuffle,
        "seed": config.train.seed,
        "filter_overlong_prompts": False,
        "truncation": "error",
        "return_raw_chat": True,
    }


def _model(config: Config, model_path: str) -> dict[str, Any]:
    model: dict[str, Any] = {"path": model_path,
                             "enable_gradient_checkpointing": config.model.gradient_checkpointing,
                             "use_remove_padding": True}
    lora = config.model.lora
    if lora is not None:
        model.update(lora_rank=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules)
    return model


def _actor(config: Config, shape: SessionShape) -> dict[str, Any]:
    cfg_rl, cfg_o, cfg_v = config.rl, config.optim, config.verl
    return {
        # one optimizer step per batch (paper): a mini-batch holds every output of the step; verl counts
        # ppo_mini_batch_size in prompts and multiplies it by rollout.n
        "ppo_mini_batch_size": config.train.batch_size * shape.calls,
        "ppo_epochs": 1,
        "use_dynamic_bsz": True,
        "ppo_max_token_len_per_gpu": cfg_v.max_tokens_per_gpu,
        "clip_ratio_low": cfg_rl.clip_low,
        "clip_ratio_high": cfg_rl.clip_high,
        "loss_agg_mode": LOSS_AGG[cfg_rl.loss_agg],
        "use_kl_loss": cfg_rl.kl_coef > 0,
        "kl_loss_coef": cfg_rl.kl_coef,
        "kl_loss_type": "low_var_kl",
        "entropy_coeff": 0.0,
        "grad_clip": cfg_o.grad_clip,
        "data_loader_seed": config.train.seed,
        "optim": {
            "lr": cfg_o.lr,
            "lr_warmup_steps": cfg_o.warmup_steps,
            "lr_scheduler_type": "constant",
            "weight_decay": cfg_o.weight_decay,
            "betas": list(cfg_o.betas),
            "clip_grad": cfg_o.grad_clip,
            "override_optimizer_config": {"eps": cfg_o.eps},
        },
        "fsdp_config": {"param_offload": cfg_v.param_offload, "optimizer_offload": cfg_v.optimizer_offload},
    }


def _rollout(config: Config, paths: RunPaths, shape: SessionShape) -> dict[str, Any]:
    cfg_rl, cfg_v = config.rl, config.verl
    return {
        "name": cfg_v.rollout,
        "mode": "async",
        "n": cfg_rl.group_size,
        "temperature": cfg_rl.temperature,
        "top_p": cfg_rl.top_p,
        "top_k": -1,
        "prompt_length": shape.prompt_tokens,
        "response_length": shape.response_tokens,
        "max_model_len": shape.prompt_tokens + shape.response_tokens,
        "tensor_model_parallel_size": cfg_v.tensor_parallel,
        "gpu_memory_utilization": cfg_v.gpu_memory_utilization,
        "calculate_log_probs": True,
        "agent": {"default_agent_loop": AGENT_NAME, "num_workers": cfg_v.agent_workers,
                  "agent_loop_config_path": str(paths.agent_loop_file)},
        "val_kwargs": {"n": 1, "temperature": 0, "top_p": 1.0, "top_k": -1, "do_sample": False},
    }


def _trainer(config: Config, paths: RunPaths, num_rows: int, resume: bool) -> dict[str, Any]:
    cfg_t, cfg_v = config.train, config.verl
    return {
        "project_name": "memtrain",
        "experiment_name": paths.out_dir.name,
        "logger": ["console", "file"] + (["tensorboard"] if cfg_t.tensorboard else []),
        "nnodes": cfg_v.nnodes,
        "n_gpus_per_node": cfg_v.gpus_per_node,
        "total_training_steps": cfg_t.steps,
        "total_epochs": math.ceil(cfg_t.steps / (num_rows // cfg_t.batch_size)),
        "save_freq": cfg_t.checkpoint_every,
        "max_actor_ckpt_to_keep": cfg_t.keep_last,
        "default_local_dir": str(paths.checkpoints),
        "resume_mode": "auto" if resume else "disable",
        "val_before_train": False,
        "test_freq": -1,
        "critic_warmup": 0,
        "use_v1": True,
        "v1": {"trainer_mode": TRAINER_MODE},
    }


def write_run_files(config: Config, paths: RunPaths, verl_config: dict[str, Any]) -> None:
    """The rendered primary config and the agent-loop list, next to each other in ``paths.verl_dir``."""
    from memtrain.io import atomic_write_text

    paths.verl_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.agent_loop_file, yaml.safe_dump(agent_loop_entries(config), sort_keys=False))
    atomic_write_text(paths.config_file, yaml.safe_dump(verl_config, sort_keys=False))


def compose_verl_config(paths: RunPaths, overrides: Sequence[str] = ()) -> Any:
    """Load the rendered config as ``verl.trainer.main_ppo`` would (Hydra compose + the same overrides)
    and run verl's validation; returns the composed ``DictConfig``. Raises ValueError naming what verl
    rejected."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(paths.verl_dir), version_base=None):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    except (HydraException, OmegaConfBaseException, AssertionError, ValueError, TypeError) as exc:
        raise UserError(f"verl rejected the rendered config {paths.config_file} "
                        f"(overrides: {list(overrides)}): {exc}") from exc
    finally:
        GlobalHydra.instance().clear()
    return cfg
