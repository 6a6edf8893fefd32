"""Hugging Face model directories from training checkpoints (``memtrain export``, ``memtrain merge-lora``):
a full checkpoint's weights as they are, a sharded one (FSDP2) assembled on one process, a LoRA adapter
merged into its base model or exported alone. Checkpoints themselves: :mod:`memtrain.rl.checkpoint`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from memtrain.errors import UserError
from memtrain.io import atomic_dir
from memtrain.log import logger
from memtrain.models import load_policy, load_tokenizer
from memtrain.rl.checkpoint import (
    CHECKPOINTS_DIR,
    META_FILE,
    STATE_FILE,
    damage_reason,
    incomplete_reason,
    is_sharded,
    latest_checkpoint,
    load_sharded_state,
    verified_checkpoint,
)


def merge_lora(ckpt_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Merge a LoRA checkpoint into its base model; save full HF weights + tokenizer to ``out_dir``.

    ``base``: the base model (short name, path or HF name); default: the run's ``model_name`` in meta.json.
    """
    from peft import PeftModel


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
        raise UserError(f"--out {out} exists and is not a model directory; refusing to replace it")
    model = load_policy(base, "float32", "cpu")
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    tokenizer = load_tokenizer(str(ckpt))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("merged %s into %s -> %s", ckpt, base, out)
    return out


_NOT_MODEL_FILES = frozenset({STATE_FILE, META_FILE})


def export_source(source: Path) -> Path:
    """The checkpoint ``source`` names: a checkpoint directory (``step_N``, ``latest``), or a run directory
    (its newest complete checkpoint whose content verifies)."""
    source = Path(source)
    if (source / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(source)
        if found is None:
            raise UserError(f"{source}: the run holds no complete checkpoint to export")
        return verified_checkpoint(source, found)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory; expected a run directory or one of its checkpoints")
    if (source / "actor").is_dir() or source.name.startswith("global_step_"):
        raise UserError(f"{source} is a verl checkpoint: verl's own merger writes the Hugging Face model "
                        f"(`python -m verl.model_merger merge --backend fsdp --local_dir {source / 'actor'} "
                        "--target_dir DIR`, in the verl environment; docs/verl.md)")
    why = incomplete_reason(source) or damage_reason(source)
    if why is not None:
        raise UserError(f"{source}: not a complete, verified checkpoint ({why})")
    return source


def export_checkpoint(source: Path, out: Path, adapter: bool = False, base: str | None = None) -> Path:
    """Write ``source``'s policy to ``out`` as a Hugging Face model directory (safetensors, config,
    tokenizer): full checkpoints as they are, sharded ones assembled in this process from their shards (no
    process group needed), LoRA ones merged into their base model, or with ``adapter`` kept as the adapter."""
    ckpt = export_source(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"--out {out} exists and is not a model directory; refusing to replace it")
    lora = (ckpt / "adapter_config.json").is_file()
    if adapter and not lora:
        raise UserError(f"--adapter: {ckpt} holds full weights, not a LoRA adapter")
    if lora and not adapter:
        return merge_lora(ckpt, out, base=base)
    with atomic_dir(out) as tmp:
        if is_sharded(ckpt):
            _assemble_sharded(ckpt, tmp)
        else:  # full weights or an adapter: the Hugging Face files as they are
            for f in sorted(ckpt.iterdir()):
                if f.is_file() and f.name not in _NOT_MODEL_FILES:
                    shutil.copy2(f, tmp / f.name)
    logger.info("exported %s -> %s", ckpt, out)
    return out


def _assemble_sharded(ckpt: Path, tmp: Path) -> None:
    """One process reads every rank's shards into a full model built from the checkpoint's config."""
    from transformers import AutoConfig, AutoModelForCausalLM


    config = AutoConfig.from_pretrained(ckpt)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_sharded_state(ckpt, model, None)
    if (ckpt / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    model.save_pretrained(tmp)
    load_tokenizer(str(ckpt)).save_pretrained(tmp)
