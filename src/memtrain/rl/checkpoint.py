"""Checkpoints of a training run: Hugging Face weights + everything needed to resume exactly.

Layout::

    RUN/checkpoints/step_000005/   model (save_pretrained: full weights, or the LoRA adapter) + tokenizer,
                                   trainer_state.pt (optimizer, scheduler, RNG states, data position, step,
                                   consecutive non-finite count, config fingerprint), meta.json (readable)
    RUN/checkpoints/latest         symlink to the newest complete checkpoint directory (relative, so the run
                                   dir can move), usable wherever a model path is expected

Under FSDP2 (``train.parallel=fsdp2``) the weights and optimizer state are sharded over the ranks: every rank
joins :func:`gather_full_state`, then rank 0 writes the same layout from the gathered state dicts; a resumed
run loads the full weights on every rank before sharding and the optimizer state through
:func:`load_full_optimizer_state`.

A checkpoint directory is written as a temp dir and renamed into place (``memtrain.io.atomic_dir``), and only
then does ``latest`` (replaced atomically) point at it, so a process killed at any moment leaves the previous
checkpoint usable. Older checkpoints beyond ``keep_last`` are deleted after the new one is in place.

A run may only be resumed with the config it started with, apart from ``RESUMABLE_KEYS`` (run length,
logging, checkpoint cadence and pure performance knobs): :func:`config_differences` names every other key
that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtrain.config import Config
from memtrain.io import atomic_dir, atomic_write_json
from memtrain.log import logger

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")

# Keys that may change when a run is resumed: they change how long it runs, what it logs, how often it saves,
# and how work is batched for speed - never what is learned from which data.
RESUMABLE_KEYS: frozenset[str] = frozenset(
    {
        "train.steps",
        "train.checkpoint_every",
        "train.keep_last",
        "train.sample_every",
        "train.sample_count",
        "train.log_every",
        "train.tensorboard",
        "train.max_nonfinite",
        "train.threads",
        "engine.batch_size",
        "engine.max_concurrency",
        "engine.timeout_s",
        "engine.max_retries",
        "rl.micro_batch_tokens",
    }
)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def fingerprint_fields(config: Config) -> dict[str, Any]:
    """The resolved config as dotted keys, minus the keys allowed to change on resume."""
    flat = _flatten(config.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


def config_fingerprint(config: Config) -> str:
    """A short hash of everything that defines what a run learns (see RESUMABLE_KEYS for what it ignores)."""
    text = json.dumps(fingerprint_fields(config), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(old: Config, new: Config) -> list[str]:
    """``key: old -> new`` for every non-resumable key that differs (sorted; empty when resumable)."""
    a, b = fingerprint_fields(old), fingerprint_fields(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def rng_state() -> dict[str, Any]:
    """The states of every random generator the trainer may draw from (python, numpy, torch, CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories of a run as (step, path), oldest first (temp dirs are ignored)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def point_latest(root: Path, name: str) -> None:
    """Make ``root/latest`` a relative symlink to ``name`` in one atomic rename (never absent, never half)."""
    tmp = root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, root / LATEST_FILE)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at; None when the run has none yet.

    A ``latest`` naming a missing directory means the run dir was edited by hand: that is an error, not a
    silent restart from scratch. (A plain file holding the directory name is accepted too.)
    """
    root = checkpoints_root(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_symlink():
        name = os.readlink(pointer)
    elif pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
    else:
        return None
    path = root / name
    if not _STEP_DIR.fullmatch(name) or not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{pointer} points at {name!r}, which is not a complete checkpoint in {root}; "
            f"complete ones: {[p.name for _, p in list_checkpoints(run_dir)] or 'none'}"
        )
    return path


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left behind (``.tmp-*``/``.old-*`` dirs, ``.latest-*`` links)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-", ".latest-"))]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    model_name: str,
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, then keep only the last ``keep_last``.

    ``state`` holds the loop's own resume data (data_position, nonfinite_streak, fingerprint, ...); the
    optimizer/scheduler/RNG states and the step are added here. ``model_state``/``optimizer_state``: full
    state dicts to write instead of the model's and optimizer's own (FSDP2: from :func:`gather_full_state`).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: expected >= 1")
    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    lora = is_peft(model)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "version": STATE_VERSION,
                "step": step,
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **state,
            },
            tmp / STATE_FILE,
        )
        meta = {
            "step": step,
            "model_name": model_name,
            "weights": "lora_adapter" if lora else "full",
            **{k: v for k, v in state.items() if isinstance(v, (int, float, str))},
        }
        if lora:
            meta["merge_command"] = (
                f"memtrain merge-lora {final} --out {Path(run_dir) / 'merged' / final.name}"
            )
        atomic_write_json(tmp / META_FILE, meta)
    point_latest(root, final.name)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def gather_full_state(model: Any, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded, CPU) weights and optimizer state of an FSDP2 model, on rank 0 ({} elsewhere).

    A collective: every rank calls it. Tied parameters (e.g. embeddings and LM head) come back as separate
    copies; they are made one tensor again, so ``save_pretrained`` writes what the unsharded model would.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if weights:
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = first.setdefault(id(param), name)
            if key != name and name in weights:
                weights[name] = weights[key]
    return weights, optim


def load_full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state saved by :func:`gather_full_state` into the sharded optimizer of ``model``
    (every rank holds the whole ``state`` and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The resume data of a checkpoint (our own file: optimizer/RNG states need full unpickling)."""
    path = Path(ckpt_dir) / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not a memtrain trainer state of version {STATE_VERSION}")
    return state


def load_adapter_weights(model: Any, ckpt_dir: Path) -> None:
    """Load a saved LoRA adapter into an identically configured peft model (same parameter objects, so the
    optimizer state saved with it lines up)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the checkpoint holds no LoRA adapter (was the run trained "
            "without model.lora?)"
        )
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(
            f"{path}: adapter weights do not fit the model (unexpected keys {unexpected[:3]}...)"
        )


def merge_lora(ckpt_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Merge a LoRA checkpoint into its base model; save full HF weights + tokenizer to ``out_dir``.

    ``base``: the base model (short name, path or HF name); default: the run's ``model_name`` in meta.json.
    """
    from peft import PeftModel

    from memtrain.models import load_policy, load_tokenizer

    ckpt = Path(ckpt_dir)
    if not (ckpt / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} is not a LoRA checkpoint (no adapter_config.json); full-weight "
            "checkpoints load directly with from_pretrained"
        )
    if base is None:
        meta_path = ckpt / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found; pass --base MODEL to name the base model")
        base = str(json.loads(meta_path.read_text(encoding="utf-8"))["model_name"])
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ValueError(f"--out {out} exists and is not a model directory; refusing to replace it")
    model = load_policy(base, "float32", "cpu")
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    tokenizer = load_tokenizer(str(ckpt))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("merged %s into %s -> %s", ckpt, base, out)
    return out
