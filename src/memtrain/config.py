"""Typed run configuration: YAML files + dotted command-line overrides.

Every section is a pydantic model with ``extra="forbid"`` so that a mistyped key is an error that names the
key and suggests the closest valid one, instead of being silently ignored.  The resolved configuration is
written next to every run (``save_config``) so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration file or override that cannot be turned into a valid config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False


class AgentConfig(Section):
    """Budgets of the chunked-reading memory agent (MEMTRAIN.md section 1)."""

    chunk_tokens: int = Field(5120, gt=0)
    memory_tokens: int = Field(1024, gt=0)
    answer_tokens: int = Field(1024, gt=0)
    max_chunks: int = Field(8, gt=0)
    truncation: Literal["centre", "head", "error"] = "centre"
    templates: dict[str, str] = Field(default_factory=dict)


class EngineConfig(Section):
    """Which generation engine serves rollouts and evaluation."""

    kind: Literal["hf", "openai", "scripted"] = "hf"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    served_model: str | None = None
    max_concurrency: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)
    timeout_s: float = Field(600.0, gt=0)


class RLConfig(Section):
    """GRPO with the joint E2E + IMR objective (MEMTRAIN.md section 4)."""

    group_size: int = Field(8, gt=0, description="G1: E2E trajectories per sample")
    imr: bool = True
    imr_group_size: int = Field(8, gt=0, description="G2: IMR samples per trajectory")
    imr_lambda: float = Field(0.5, ge=0.0)
    kl_coef: float = Field(1e-3, ge=0.0)
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.2, ge=0.0)
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"
    adv_std_norm: bool = False
    dynamic_filter: bool = True
    fill_filtered_batches: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    micro_batch_tokens: int = Field(16384, gt=0)


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)


class DataConfig(Section):
    """Where the task's training rows come from (a directory of parquet shards + manifest.json)."""

    path: str = ""
    shuffle: bool = True


class TrainConfig(Section):
    task: Literal["proxy", "longqa", "searchqa"] = "proxy"
    batch_size: int = Field(32, gt=0, description="samples (prompts) per step")
    steps: int = Field(300, gt=0)
    seed: int = 42
    checkpoint_every: int = Field(50, gt=0)
    keep_last: int = Field(2, gt=0)
    sample_every: int = Field(10, gt=0)
    log_every: int = Field(1, gt=0)


class Config(Section):
    """The whole run: one object that every command reads its settings from."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


C = TypeVar("C", bound=BaseModel)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value) with the value parsed as YAML (so 8 -> int, [1,2] -> list)."""
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type[C] = Config) -> C:  # type: ignore[assignment]
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
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
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
