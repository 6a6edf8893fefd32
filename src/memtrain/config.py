"""Typed run configuration: YAML files + dotted command-line overrides.

Every section is a pydantic model with ``extra="forbid"`` so that a mistyped key is an error that names the
key and suggests the closest valid one, instead of being silently ignored.  The resolved configuration is
written next to every run (``save_config``) so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memtrain.errors import UserError

ComputeDtype = Literal["auto", "float32", "bfloat16"]  # model.compute_dtype (memtrain.precision)


class ConfigError(UserError):
    """A configuration file or override that cannot be turned into a valid config."""


def _non_finite(value: Any, where: str) -> str | None:
    """The dotted path of the first NaN/inf float in ``value`` (lists, tuples, dicts, sets walked)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, (list, tuple, set, frozenset)):
        return next((w for i, v in enumerate(value) if (w := _non_finite(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _non_finite(v, f"{where}.{k}"))), None)
    return None


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and so is any NaN/inf number (an ``lr=inf``
    would otherwise train to an all-NaN checkpoint and exit 0)."""

    # allow_inf_nan=False: every float field (nested in lists/tuples/dicts too) must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        """``train.steps=true`` is not 1 step: pydantic's lax mode reads a boolean as a number."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool) and field.annotation in (int, float, int | None, float | None):
                    kind = "an integer" if field.annotation in (int, int | None) else "a number"
                    raise ValueError(f"{name}={str(value).lower()}: expected {kind}, not a boolean")
        return data

    @model_validator(mode="after")
    def _finite_floats(self) -> Section:
        """Also catches floats in fields pydantic does not type as float (Any, unions with str)."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                continue  # validated by its own Section
            where = _non_finite(value, name)
            if where is not None:
                raise ValueError(f"{where}={value!r}: expected a finite number, not NaN or infinity")
        return self


class LoraConfig(Section):
    """LoRA adapters through peft; the reference policy is the base model with adapters disabled."""

    rank: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Section):
    """The policy: an embedded short name (``smollm2-135m``), a local checkpoint dir or a HF name."""

    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="dtype of the matmuls in training forward/backward, the KL reference and HF-engine "
        "generation, under autocast over float32 master weights: auto = bf16 where the device has fast bf16 "
        "units (AMX/AVX512-BF16 CPUs, Arm BF16, Ampere+ GPUs), detected at run time; else float32",
    )
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the policy trains and generates: auto = CUDA when available, else CPU"
    )


class AgentConfig(Section):
    """Budgets and prompts of the chunked-reading memory agent (docs/method.md section 1)."""

    chunk_tokens: int = Field(5120, gt=0, description="document tokens per chunk (paper 5120, ref. 5000)")
    memory_tokens: int = Field(1024, gt=0, description="cap on each memory the model writes")
    answer_tokens: int = Field(1024, gt=0, description="cap on the final answer")
    instruction_tokens: int = Field(
        1024, gt=0, description="budget of instruction + problem: the memory prompt without its memory and "
        "chunk (paper 1024); a sample whose problem does not fit is an error naming it"
    )
    max_chunks: int | None = Field(
        8, gt=0, description="longer documents are truncated (see truncation); null = read every chunk "
        "(what `memtrain eval longqa` does unless --max-chunks is given)"
    )
    truncation: Literal["centre", "head", "error"] = Field(
        "centre",
        description="over-long documents: keep head and tail chunks (centre), the first chunks "
        "(head), or fail (error)",
    )
    templates: dict[str, str] = Field(
        default_factory=dict,
        description="overrides of memtrain.prompts.DEFAULT_TEMPLATES by name (memory, "
        "final, imr, initial_memory, ...); checked for unknown names and missing placeholders",
    )

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: dict[str, str]) -> dict[str, str]:
        from memtrain.prompts import validate_templates

        validate_templates(value)
        return value


class EngineConfig(Section):
    """Which generation engine serves rollouts and evaluation (``kind``), and each engine's settings."""

    kind: str = Field(
        "hf",
        description="hf (transformers, in process), vllm (vLLM, in process; docs/vllm.md), vllm_server (vLLM "
        "servers kept on the policy: rollouts on other machines), openai (an OpenAI-compatible server, "
        "evaluation only), or a kind another module registered (memtrain.engines.register_engine)",
    )
    base_url: str | None = Field(
        None, description="openai / vllm_server: the server URL (vllm_server: one or more, comma-separated)",
    )
    weights_dir: str | None = Field(
        None,
        description="vllm_server: where the trainer writes the weights each server reloads after every "
        "update; every server must see it at the same path (a shared filesystem). Default: a temporary "
        "directory (servers on this machine only)",
    )
    api_key_env: str = "OPENAI_API_KEY"
    served_model: str | None = None
    max_concurrency: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)
    prefill_tokens: int | None = Field(
        None,
        gt=0,
        description="hf: padded tokens per prefill forward (prompts are prefilled in groups, then decoded "
        "together); default 2048 on CPU, where big prefills run slower, and one prefill per batch on GPU",
    )
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(5, ge=0, description="openai: retries on 429/5xx/timeouts/connection errors")
    vllm_extras: bool = Field(
        True,
        description="openai: ask for token ids (return_token_ids...); off for "
        "servers that reject unknown fields",
    )
    dtype: ComputeDtype = Field(
        "auto",
        description="vllm: the engine's weights and compute dtype; auto = the compute dtype of the model it "
        "is built from (the trainer's model.compute_dtype), else bf16 where the device runs it fast",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="vllm: longest prompt + completion; default the model's context length"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm: KV cache size; default 1 GiB on CPU (46k tokens of SmolLM2-135M), on GPU what "
        "gpu_memory_utilization leaves after the weights",
    )
    gpu_memory_utilization: float = Field(
        0.4, gt=0.0, le=1.0,
        description="vllm on GPU: the engine's share of GPU memory (weights + KV cache); the rest is the "
        "trainer's. The engine sleeps (frees it) while the trainer updates when the trainer asks it to",
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="vllm: tokens per KV cache block, the unit its prefix cache shares between prompts; "
        "default vLLM's (128 on CPU, 16 on GPU). The agent's prompts share a template prefix (~110 "
        "SmolLM2 tokens) that a 128-token block never shares across documents; 32 does",
    )
    enforce_eager: bool = Field(
        True,
        description="vllm: run eagerly; false = torch.compile (CUDA graphs on GPU), ~2x faster decoding on "
        "CPU after a first compile of ~2 minutes (cached on disk)",
    )
    sync_check_tol: float | None = Field(
        None,
        gt=0.0,
        description="vllm: after each weight sync, the largest |engine - trainer| log-prob allowed on a "
        "fixed probe text (the mean must stay under a fifth of it), else the run stops; default 1e-3 in "
        "float32, 0.5 in bf16 (measured bf16 noise: max 0.05-0.23, mean 0.02-0.045)",
    )
    sync_check_ratio: float = Field(
        3.0,
        gt=1.0,
        description="vllm: the check relative to the first sync: the run stops when the mean |engine - "
        "trainer| log-prob on the probe text exceeds this many times the first sync's (in bf16 that gap is "
        "numerical noise, 1.0-1.5x its first value over the demo's runs; an engine that misses part of the "
        "updates drifts away with the training)",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from memtrain.engines.registry import check_engine_kind

        return check_engine_kind(value)


class RLConfig(Section):
    """GRPO with the joint E2E + IMR objective (docs/method.md section 4)."""

    group_size: int = Field(8, gt=0, description="G1: E2E trajectories per sample")
    imr: bool = True
    imr_group_size: int = Field(8, gt=0, description="G2: IMR samples per trajectory")
    imr_lambda: float = Field(0.5, ge=0.0)
    imr_questions: int = Field(
        1, gt=0, description="IMR prompts drawn per trajectory (the paper: 1), each answered G2 times and an "
        "advantage group of its own; the bonus is lambda times the mean match over all M x G2 answers. IMR "
        "answers are short and share their prompt, so more questions are a cheap source of GRPO signal"
    )
    imr_credit: Literal["broadcast", "writer"] = Field(
        "broadcast",
        description="which turns of an E2E trajectory the IMR bonus credits: broadcast = every turn (the "
        "paper: one advantage per trajectory); writer = only the memory turns that wrote the memory the IMR "
        "question asked (turns 1..k), the match reward still to every turn (memtrain.rl.core.writer_credit)",
    )
    kl_coef: float = Field(1e-3, ge=0.0)
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.2, ge=0.0)
    loss_agg: str = Field(
        "seq_mean_token_mean",
        description="loss aggregation, one registered with memtrain.rl.core.register_loss_agg: "
        "seq_mean_token_mean = paper Eq. 4 (token mean per sequence, then mean over sequences: a trajectory "
        "with more turns weighs more); token_mean = reference scripts (longer outputs weigh more); "
        "session_mean = every rollout (trajectory, IMR sample, search episode) weighs the same, its weight "
        "split evenly over its turns",
    )
    adv_std_norm: bool = False
    dynamic_filter: bool = True
    reward_metric: str | None = Field(
        None,
        description="the reward (and IMR match): a name registered in memtrain.rl.rewards - the answer "
        "metrics strict_em, em, sub_em, f1, span_em, span_f1, or one of your own (register_reward); default: "
        "the paper's for the task (strict boxed EM for proxy and longqa, EM for searchqa). span_f1 (the "
        "first answer span, memtrain.scoring) gives tiny models a denser signal that listing entities "
        "cannot game",
    )
    fill_filtered_batches: bool = Field(
        False, description="DAPO's dynamic sampling: when the filter leaves too few groups, roll out more "
        "rows (at most train.fill_max_rounds rounds) until train.batch_size row groups survive, or "
        "rl.fill_min_groups groups of any kind"
    )
    fill_min_groups: int | None = Field(
        None, gt=0, description="with fill_filtered_batches: the target is this many kept groups of any "
        "kind (E2E, IMR, search) instead of train.batch_size row groups - for a small model whose signal is "
        "mostly in IMR groups; each extra round rolls out about as many rows as the missing groups need"
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="rollout sampling temperature; the engines report and the update recomputes log-probs "
        "under softmax(logits / temperature): the policy, the old log-probs and the KL reference (as verl)",
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="rollout nucleus sampling; training refuses < 1 (the update cannot recompute the "
        "truncated distribution, so the ratio and KL would be biased)",
    )
    micro_batch_tokens: int = Field(16384, gt=0, description="padded tokens per forward/backward micro-batch")
    share_prompts: bool = Field(
        True,
        description="tokens that the sequences of a micro-batch share run once, the rest of each on their KV "
        "cache: a whole prompt (the G2 IMR answers to one memory, the first memory turns of a row's G1 "
        "trajectories), else a prompt template's leading tokens (>= 32; the instructions and problem of "
        "every memory turn). The same log-probs and gradients for (n - 1) x shared tokens fewer. Off under "
        "FSDP2 and gradient checkpointing (each needs one forward per pass)",
    )
    old_logprobs: Literal["auto", "sampler", "recompute"] = Field(
        "auto",
        description="PPO 'old' log-probs: the engine's when they agree with a recompute within "
        "old_logprob_tol (auto), always the engine's (sampler), or the policy's own before the update",
    )
    old_logprob_tol: float = Field(0.05, gt=0.0, description="max |sampler - recomputed| log-prob for auto")
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="truncated importance sampling for the train/inference mismatch (verl rollout "
        "correction, token level): where the old log-probs are the trainer's recompute and the sampler's are "
        "known, each token's policy-gradient term is weighted by min(exp(trainer - sampler), tis_cap); "
        "null = off. Typical: 2.0 with old_logprobs=recompute",
    )

    @field_validator("loss_agg")
    @classmethod
    def _registered_loss_agg(cls, value: str) -> str:
        from memtrain.rl.core import get_loss_agg  # torch: only when a config names an aggregation

        get_loss_agg(value)
        return value


class OptimConfig(Section):
    """AdamW with linear warm-up then a constant learning rate, and grad-norm clipping (paper section 4)."""

    lr: float = Field(1e-6, gt=0.0, le=1.0, description="peak learning rate; above 1.0 no optimizer "
                      "of a language model takes a useful step (an lr=1e30 run saved weights of 1e30)")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    max_update_ratio: float | None = Field(
        1.0, gt=0.0, description="a step whose update norm exceeds this fraction of the weights' norm "
        "(||delta theta|| / ||theta||, logged as update_ratio) exploded: it is undone and counted like a "
        "non-finite step (skipped_exploded; train.max_nonfinite in a row stop the run). AdamW moves each "
        "weight by about lr, so the ratio is about lr / rms(weights): ~1e-3 for the demo, 1e30 for an "
        "lr=1e30 typo; null: no check. The native trainer's (the verl backend does not check it)",
    )


class DataConfig(Section):
    """Where the task's training rows come from (a directory of parquet shards + manifest.json)."""

    path: str = Field("", description="dataset directory built by `memtrain data ...` (needed to train)")
    shuffle: bool = Field(True, description="reshuffle the rows every epoch (deterministic from train.seed)")


class TrainConfig(Section):
    """The training loop: task, batch, length, seeds, logging and checkpointing (``memtrain train``)."""

    task: str = Field(
        "proxy",
        description="which rollout/reward task trains: a name registered with @register_task "
        "(memtrain.rl.tasks.registry: proxy, longqa, searchqa built in), checked when the task is built",
    )
    batch_size: int = Field(32, gt=0, description="samples (prompts) per step")
    steps: int = Field(300, gt=0, description="optimizer steps in total (may be raised on --resume)")
    seed: int = Field(42, description="seeds data order, rollouts, IMR draws and torch")
    checkpoint_every: int = Field(50, gt=0, description="save a checkpoint every N steps and at the last one")
    keep_last: int = Field(2, gt=0, description="checkpoints kept on disk; older ones are deleted")
    checkpoint_format: Literal["auto", "full", "sharded"] = Field(
        "auto",
        description="full = Hugging Face weights (under FSDP2 gathered onto rank 0 with the optimizer "
        "state: ~12 bytes per parameter in one process); sharded = every rank writes its own shards "
        "(torch.distributed.checkpoint; resumable on any number of ranks; `memtrain export` makes a Hugging "
        "Face model of it); auto = sharded under train.parallel=fsdp2, else full",
    )
    sample_every: int = Field(10, gt=0, description="write readable trajectories to samples.jsonl every N")
    sample_count: int = Field(4, gt=0, description="trajectories written per sampled step")
    log_every: int = Field(1, gt=0, description="print a progress line every N steps (metrics: every step)")
    tensorboard: bool = Field(True, description="also write TensorBoard events to RUN_DIR/tensorboard")
    wandb: bool = Field(
        False, description="also log to Weights & Biases (pip install -e '.[wandb]'): the metrics of every "
        "step and validation and the config, into RUN_DIR/wandb; a resumed run continues the same W&B run"
    )
    wandb_project: str = Field("memtrain", min_length=1, description="the W&B project")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: no network needed, upload later with `wandb sync RUN_DIR/wandb`; "
        "online: stream to the W&B server (needs WANDB_API_KEY)"
    )
    max_nonfinite: int = Field(
        3, gt=0, description="stop after this many consecutive steps skipped for non-finite loss/gradients"
    )
    fill_max_rounds: int = Field(
        4,
        gt=0,
        description="with rl.fill_filtered_batches: at most this many "
        "rollout rounds per step (the first included)",
    )
    collapse_patience: int = Field(
        3, gt=0, description="warn (warn_no_signal in the metrics row) after this many steps in a row that "
        "kept no group; a step where every memory or every answer hit its cap is flagged at once"
    )
    threads: int | None = Field(
        None, gt=0, description="torch CPU threads; default $MEMTRAIN_THREADS, else all cores"
    )
    eval_data: str = Field(
        "",
        description="a held-out dataset for validation during training (empty: none): the policy is "
        "evaluated greedily on it with the training engine before the first step, every train.eval_every "
        "steps and after the last, by the evaluation train.eval names; results in RUN_DIR/eval/step_N, "
        "compared by `memtrain report`, drawn by `memtrain plot`",
    )
    eval: str | None = Field(
        None,
        description="the registered evaluation (`memtrain eval NAME`) that validates on train.eval_data; "
        "default: the one named like train.task (proxy for the proxy task)",
    )
    eval_every: int = Field(0, ge=0, description="validate every N steps (0: before the first and after the "
                            "last step only)")
    eval_limit: int | None = Field(None, gt=0, description="validate on the first N rows of train.eval_data")
    allow_eval_overlap: bool = Field(
        False, description="validate on a set that shares rows or source passages with data.path (refused by "
        "default: a held-out score measured on training documents is not held out)",
    )
    eval_batch_size: int = Field(32, gt=0, description="rows per validation batch")
    eval_imr_questions: int = Field(
        1, ge=1, description="proxy validation: IMR questions per held-out document (the paper asks one; "
        "more questions are cheap beside the memory turns a document costs, and narrow the intervals)")
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="under torchrun: ddp = a full model per rank, gradients all-reduced; fsdp2 = weights, "
        "gradients and optimizer state sharded over the ranks (models that do not fit one device; not with "
        "model.lora; torchrun --nproc-per-node 1 runs the sharded paths on one device); ignored in a process "
        "torchrun did not start",
    )


class SearchConfig(Section):
    """The search agent (MEM1 style, docs/method.md section 6) and its retriever: ``train.task: searchqa``
    and ``memtrain eval searchqa``."""

    retriever: str = Field(
        "",
        description="http(s):// URL of `memtrain serve-retriever`, an index "
        "directory, or a wiki-18 style corpus JSONL (a BM25 index is built once, cached)",
    )
    index_kind: Literal["bm25", "dense", "ivf-flat", "ivf-pq", "hnsw"] = Field(
        "bm25", description="index built for a corpus JSONL (dense: exact; ivf-*, hnsw: approximate)")
    embedder: str = Field("minilm", description="sentence-transformers model of a dense index")
    max_turns: int = Field(6, gt=0, description="model turns per episode; the last one must answer")
    response_tokens: int = Field(1024, gt=0, description="cap on each reply (memory + action)")
    results_tokens: int = Field(1024, gt=0, description="cap on the search results shown per turn")
    top_k: int = Field(3, gt=0, le=100, description="passages per search")


class VerlConfig(Section):
    """The verl backend (``memtrain train --backend verl``): cluster shape and rollout server. Everything
    else (model, budgets, GRPO, optimizer, steps) is rendered from the other sections by
    ``memtrain.backends.verl.config``; ``overrides`` reaches any other verl (Hydra) key."""

    rollout: Literal["vllm", "sglang"] = Field("vllm", description="verl's rollout server")
    nnodes: int = Field(1, gt=0, description="nodes of the Ray cluster")
    gpus_per_node: int = Field(8, gt=0, description="GPUs per node")
    tensor_parallel: int = Field(
        1, gt=0, description="GPUs per rollout replica (vLLM/SGLang tensor parallel size)"
    )
    gpu_memory_utilization: float = Field(0.6, gt=0.0, le=1.0, description="rollout server's share of a GPU")
    max_tokens_per_gpu: int = Field(
        16384,
        gt=0,
        description="actor/ref micro-batch tokens per GPU (dynamic "
        "batch size); at least one whole prompt + response",
    )
    agent_workers: int = Field(8, gt=0, description="verl agent-loop worker actors driving the rollouts")
    param_offload: bool = Field(False, description="FSDP parameter offload to CPU (large models, few GPUs)")
    optimizer_offload: bool = Field(False, description="FSDP optimizer-state offload to CPU")
    overrides: list[str] = Field(
        default_factory=list,
        description="raw verl Hydra overrides KEY=VALUE, applied after everything memtrain renders",
    )


class Config(Section):
    """The whole run: one object that every command reads its settings from."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    verl: VerlConfig = Field(default_factory=VerlConfig)
    task: dict[str, Any] = Field(
        default_factory=dict,
        description="train.task's own settings, validated by the model the task registered "
        "(@register_task(name, settings=...)): an unknown key or bad value is a one-line error when the task "
        "is built; empty for the built-in tasks",
    )


C = TypeVar("C", bound=BaseModel)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML (8 -> int, [1,2] -> list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. rl.group_size=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string; users mean a number
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation of the keys happens later, in one place."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid field names of the section that ``loc`` (minus its last element) points into."""
    model: Any = cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _explain(cls: type[BaseModel], exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"unknown key {dotted!r}{hint} (valid here: {', '.join(valid)})")
        else:
            lines.append(f"{dotted}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"invalid config from {source}:\n  " + "\n  ".join(lines))


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[C] = Config
) -> C:  # type: ignore[assignment]
    """Read a YAML file (optional), apply dotted overrides and validate into ``cls``."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?): expected YAML"
                              ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}"
            )
        raw = loaded or {}
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _explain(cls, exc, source) from None


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so a run records exactly what it ran with."""
    from memtrain.io import atomic_write_text

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return atomic_write_text(Path(path), text)
