"""Checkpoints of a training run: Hugging Face weights + everything needed to resume exactly.

Layout::

    RUN/checkpoints/step_000005/   model (save_pretrained: full weights, or the LoRA adapter) + tokenizer,
                                   trainer_state.pt (optimizer, scheduler, RNG states, data position, step,
                                   consecutive non-finite count, config fingerprint), meta.json (readable)
    RUN/checkpoints/latest         symlink to the newest complete checkpoint directory (relative, so the run
                                   dir can move), usable wherever a model path is expected

``meta.json`` (written last) records the size and sha256 of every other file, so a half-copied directory
(an interrupted ``rsync``) is not taken for a complete one; a resume verifies the content (hashes, finite
weights: :func:`damage_reason`) of the newest complete ``step_*`` directory, found from the directories
themselves (``latest`` may be missing or a copy), and falls back to the newest that verifies, saying so.

Under FSDP2 (``train.parallel=fsdp2``) the weights and optimizer state are sharded over the ranks, and so is
the checkpoint by default (``train.checkpoint_format``): ``step_N/sharded/`` holds every rank's shards
(torch.distributed.checkpoint, :func:`save_sharded_state`), next to the model config, tokenizer, trainer
state (without the optimizer) and meta.json; it resumes on any number of ranks or in one process
(:func:`load_sharded_state`) and :mod:`memtrain.rl.export` makes a Hugging Face model of it. With
``train.checkpoint_format=full`` every rank joins :func:`gather_full_state` instead and rank 0 writes the
layout above; a resumed run loads the full weights on every rank before sharding and the optimizer state
through :func:`load_full_optimizer_state`.

A checkpoint directory is written as a temp dir, fsynced and renamed into place (``memtrain.io.atomic_dir``),
and only then does ``latest`` (replaced atomically) point at it, so a process killed at any moment leaves
the previous checkpoint usable. Older checkpoints beyond ``keep_last`` are deleted after the new one is in
place (never newer ones: a run resumed from an older step leaves them until it redoes those steps).

A run may only be resumed with the config it started with, apart from ``RESUMABLE_KEYS`` (run length,
logging, checkpoint and validation cadence and pure performance knobs): :func:`config_differences` names
every other key that changed.
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
from memtrain.errors import UserError
from memtrain.io import (
    atomic_dir,
    atomic_write_json,
    disk_full_error,
    fsync_dir,
    read_jsonl,
    replace_dir,
    sha256_file,
    temp_dir_for,
)
from memtrain.log import logger
from memtrain.rl.metrics import METRICS_FILE

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
STATE_VERSION = 1
SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint files
_STEP_DIR = re.compile(r"step_(\d+)")
# Weight files of a checkpoint written before meta.json listed its files (any one of them is enough).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                 "pytorch_model.bin")

# Keys that may change when a run is resumed: they change how long it runs, what it logs, how often it saves,
# and how work is batched for speed - never what is learned from which data.
RESUMABLE_KEYS: frozenset[str] = frozenset({
    "train.steps", "train.checkpoint_every", "train.keep_last", "train.checkpoint_format",
    "train.collapse_patience", "train.sample_every", "train.sample_count", "train.log_every",
    "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_mode", "train.max_nonfinite",
    "train.threads", "train.eval_data", "train.eval", "train.eval_every", "train.eval_limit",
    "train.eval_batch_size", "train.eval_imr_questions", "engine.batch_size", "engine.max_concurrency",
    "engine.timeout_s", "engine.max_retries", "rl.micro_batch_tokens",
})


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


def _safe_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """The RNG states with numpy's key array as a tensor, so ``torch.load(weights_only=True)`` reads them."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                               int(has_gauss), float(cached))}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):  # stored by _safe_rng_state
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): a missing file, or one whose size differs
    from the size meta.json recorded (a half-finished copy)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    for name in (STATE_FILE, META_FILE):
        if not (path / name).is_file():
            return f"no {name}"
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {META_FILE} ({exc.__class__.__name__})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):  # written before meta.json listed its files
        return None if any((path / w).is_file() for w in _WEIGHT_FILES) else "no model weights"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"no {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} expected"
    return None


def _nonfinite_tensor(path: Path) -> str | None:
    """The name of a floating-point tensor of a safetensors file holding NaN or infinity, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            t = fh.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def damage_reason(path: Path) -> str | None:
    """Why a complete checkpoint's content cannot be trusted (None when it verifies): a file whose sha256
    differs from the one meta.json recorded (checkpoints written before hashes were recorded skip this), or
    a weight file holding a non-finite value. Reads every file: called on resume, not on listing."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    hashes = meta.get("sha256") if isinstance(meta, dict) else None
    for name, digest in (hashes or {}).items():
        if sha256_file(path / name) != digest:
            return f"{name} does not match the sha256 in {META_FILE} (damaged after it was written)"
    for weights in sorted(path.glob("*.safetensors")):
        try:
            bad = _nonfinite_tensor(weights)
        except Exception as exc:  # safetensors' own error types: a damaged header or payload
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{weights.name} is unreadable ({first})"
        if bad is not None:
            return f"{weights.name}: tensor {bad} holds NaN or infinity"
    return None


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))


def _step_of(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories of a run as (step, path), oldest first (temp dirs are ignored)."""
    return [(step, p) for step, p in _step_dirs(run_dir) if incomplete_reason(p) is None]


def incomplete_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """``step_*`` directories that are not complete checkpoints, with the reason (oldest first)."""
    out = []
    for _, p in _step_dirs(run_dir):
        reason = incomplete_reason(p)
        if reason is not None:
            out.append((p, reason))
    return out


def point_latest(root: Path, name: str) -> None:
    """Make ``root/latest`` a relative symlink to ``name`` in one atomic rename (never absent, never half)."""
    tmp = root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    pointer = root / LATEST_FILE
    if pointer.is_dir() and not pointer.is_symlink():  # a copy left by `cp -rL`: a symlink cannot replace it
        aside = root / f".old-{LATEST_FILE}-{os.getpid()}"
        os.replace(pointer, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, pointer)
    fsync_dir(root)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``step_*`` checkpoint directory; None when the run has none.

    Found from the step directories themselves, since ``latest`` does not survive every copy (``rsync -r``
    drops symlinks, ``cp -rL`` turns it into a directory). A ``latest`` symlink (or plain file holding a
    name) that names an incomplete or missing checkpoint means the run dir was edited or half-copied: that
    is an error, not a silent restart from an older step.
    """
    root = checkpoints_root(run_dir)
    pointer = root / LATEST_FILE
    name = None
    if pointer.is_symlink():
        name = os.readlink(pointer)
    elif pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
    complete = list_checkpoints(run_dir)
    if name is not None and not (_STEP_DIR.fullmatch(name) and incomplete_reason(root / name) is None):
        why = incomplete_reason(root / name) if _STEP_DIR.fullmatch(name) else "not a step_* directory"
        raise FileNotFoundError(
            f"{pointer} points at {name!r}, which is not a complete checkpoint in {root} ({why}); "
            f"complete ones: {[p.name for _, p in complete] or 'none'}"
        )
    return complete[-1][1] if complete else None


def _checkpointed_metric_steps(run_dir: Path, checkpoint_every: int) -> list[int]:
    """Steps in metrics.jsonl after which a checkpoint was surely written: a multiple of
    ``checkpoint_every`` whose update was not skipped, followed by a later logged step (step N's row is
    written before its checkpoint: a run killed saving its first checkpoint has the row only)."""

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    steps = []
    for row in read_jsonl(path):
        step = row.get("step")
        if isinstance(step, int) and step > 0 and step % checkpoint_every == 0 and row.get(
            "skipped_nonfinite"
        ) != 1.0:
            steps.append(step)
    logged = [row.get("step") for row in read_jsonl(path) if isinstance(row.get("step"), int)]
    last = max(logged, default=0)
    return [s for s in steps if s < last]


def resume_checkpoint(run_dir: Path, checkpoint_every: int | None = None) -> Path | None:
    """The checkpoint to resume ``run_dir`` from, or None for a run killed before its first checkpoint.

    Refuses (FileNotFoundError) when checkpoints were written but none is complete now (lost or half-copied
    files, or metrics.jsonl has a step at which one was due): restarting from step 1 would overwrite history
    it cannot account for. Newer incomplete step directories than the one chosen are named in a warning.
    """
    found = latest_checkpoint(run_dir)
    root = checkpoints_root(run_dir)
    if found is None and checkpoint_every:
        due = _checkpointed_metric_steps(run_dir, checkpoint_every)
        if due:
            raise FileNotFoundError(
                f"cannot resume {run_dir}: metrics.jsonl records step {due[-1]}, after which a checkpoint "
                f"was written, but {root} holds no complete checkpoint; copy the checkpoints/ directory "
                "along with the run (or start a new run with another --out)"
            )
    found_step = -1 if found is None else _step_of(found)
    newer = [(p, why) for p, why in incomplete_checkpoints(run_dir) if _step_of(p) > found_step]
    if found is None:
        copy = root / LATEST_FILE
        if newer or (copy.is_dir() and not copy.is_symlink()):
            what = "; ".join(f"{p.name}: {why}" for p, why in newer) or f"only {copy} (a directory copy)"
            raise FileNotFoundError(
                f"cannot resume {run_dir}: no complete checkpoint in {root} ({what}); finish copying the "
                "run directory (or rename a complete copy to step_NNNNNN), or start a new run with "
                "another --out"
            )
        return None
    for p, why in newer:
        logger.warning("resume: skipping incomplete checkpoint %s (%s); resuming from %s", p, why, found.name)
    return verified_checkpoint(run_dir, found)


def verified_checkpoint(run_dir: Path, found: Path) -> Path:
    """``found`` if its content verifies, else the newest older complete checkpoint that does (with a
    warning naming what was wrong); refuses when none does."""
    damaged = []
    for step, candidate in reversed(list_checkpoints(run_dir)):
        if step > _step_of(found):
            continue
        why = damage_reason(candidate)
        if why is None:
            if damaged:
                logger.warning("resume: %s; resuming from %s instead (the steps after it are redone)",
                               "; ".join(f"{p.name} is damaged ({w})" for p, w in damaged), candidate.name)
            return candidate
        damaged.append((candidate, why))
    raise FileNotFoundError(
        f"cannot resume {run_dir}: no checkpoint verifies ("
        + "; ".join(f"{p.name}: {w}" for p, w in damaged)
        + "); restore the checkpoints from a copy, or start a new run with another --out")


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
    final = checkpoints_root(run_dir) / step_dir_name(step)
    lora = is_peft(model)
    try:
        with atomic_dir(final, durable=True) as tmp:
            model.save_pretrained(tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
            _write_state_and_meta(tmp, step, scheduler, {"optimizer": optimizer_state, **state}, model_name,
                                  "lora_adapter" if lora else "full", run_dir, final)
    except Exception as exc:  # a full disk is one line, whichever library hit it
        full = disk_full_error(exc, final, f"checkpoint {final.name}")
        if full is not None:
            raise full from exc
        raise
    _publish(run_dir, final, step, keep_last)
    return final


def _write_state_and_meta(tmp: Path, step: int, scheduler: Any, state: dict[str, Any], model_name: str,
                          weights: str, run_dir: Path, final: Path) -> None:
    """trainer_state.pt (``state`` + step, scheduler and RNG states), then meta.json: the size and sha256 of
    every other file, so a half-copied checkpoint is recognised (incomplete_reason) and a damaged one of the
    right size too (damage_reason)."""
    torch.save({"version": STATE_VERSION, "step": step, "scheduler": scheduler.state_dict(),
                "rng": _safe_rng_state(rng_state()), **state}, tmp / STATE_FILE)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    meta: dict[str, Any] = {
        "step": step,
        "model_name": model_name,
        "weights": weights,
        **{k: v for k, v in state.items() if isinstance(v, (int, float, str))},
        "files": {str(f.relative_to(tmp)): f.stat().st_size for f in files},
        "sha256": {str(f.relative_to(tmp)): sha256_file(f) for f in files},
    }
    if weights != "full":
        meta["export_command"] = f"memtrain export {final} --out {Path(run_dir) / 'exported' / final.name}"
    atomic_write_json(tmp / META_FILE, meta)


def _publish(run_dir: Path, final: Path, step: int, keep_last: int) -> None:
    """Point ``latest`` at the new checkpoint, then prune only older ones than it: never one of a step this
    (resumed) run has not redone yet."""
    point_latest(checkpoints_root(run_dir), final.name)
    for _, old in [c for c in list_checkpoints(run_dir) if c[0] <= step][:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


# --- sharded checkpoints (FSDP2): torch.distributed.checkpoint, every rank writes its own shards ------------

def is_sharded(path: Path) -> bool:
    """A checkpoint whose weights and optimizer state are torch.distributed.checkpoint shards."""
    return (Path(path) / SHARDED_DIR).is_dir()


def begin_sharded_checkpoint(run_dir: Path, step: int) -> Path:
    """Rank 0: the temp directory every rank writes its shards into (renamed into place by
    :func:`end_sharded_checkpoint`; a writer that dies leaves only a ``.tmp-*`` dir, cleaned by the next)."""
    return temp_dir_for(checkpoints_root(run_dir) / step_dir_name(step))


def save_sharded_state(model: Any, optimizer: torch.optim.Optimizer, tmp: Path) -> None:
    """Every rank writes its own shards of the weights and the optimizer state (a collective; no rank ever
    holds the full state). Loadable on any number of ranks, or in one process (:func:`load_sharded_state`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(tmp / SHARDED_DIR))


def end_sharded_checkpoint(tmp: Path, run_dir: Path, step: int, model: Any, tokenizer: Any, scheduler: Any,
                           state: dict[str, Any], keep_last: int, model_name: str) -> Path:
    """Rank 0, once every rank wrote its shards: the model config, tokenizer, trainer state and meta.json,
    then the rename into place and ``latest``."""
    final = checkpoints_root(run_dir) / step_dir_name(step)
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_state_and_meta(tmp, step, scheduler, state, model_name, "sharded", run_dir, final)
        replace_dir(tmp, final, durable=True)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, final, f"checkpoint {final.name}")
        if full is not None:
            raise full from exc
        raise
    _publish(run_dir, final, step, keep_last)
    return final


def load_sharded_state(ckpt_dir: Path, model: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint's weights (and, given ``optimizer``, its state) into ``model``: FSDP2-sharded
    over any number of ranks, or a plain model in one process (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    where = str(Path(ckpt_dir) / SHARDED_DIR)
    if optimizer is None:
        weights = get_model_state_dict(model)
        dcp.load({"model": weights}, checkpoint_id=where)
        set_model_state_dict(model, weights)
        return
    weights, optim = get_state_dict(model, optimizer)
    loaded = {"model": weights, "optimizer": optim}
    dcp.load(loaded, checkpoint_id=where)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


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


def _numpy_safe_globals() -> list[Any]:
    """What numpy's RNG key array needs under ``weights_only=True`` (checkpoints written before the key array
    was stored as a tensor)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The resume data of a checkpoint, unpickled safely (``weights_only``: tensors and plain containers,
    never arbitrary code, even from a run directory someone else wrote)."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a damaged or foreign file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(
            f"{path}: cannot load the trainer state ({exc.__class__.__name__}: {first}); the checkpoint is "
            "damaged or was not written by memtrain: delete that step directory to resume from an older one"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UserError(f"{path}: not a memtrain trainer state of version {STATE_VERSION}")
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
        raise UserError(
            f"{path}: adapter weights do not fit the model (unexpected keys {unexpected[:3]}...)"
        )
