"""Compute precision: the dtype forward, backward and generation run in, apart from the stored weights.

Trainable weights and optimizer state stay float32 (AdamW steps of lr ~1e-6 vanish in bf16); the matmuls
run in bf16 under ``torch.autocast`` where the hardware has fast bf16 units (CPUs with AMX-BF16 or
AVX512-BF16, Arm cores with the BF16 extension, CUDA GPUs from Ampere on), since there they run several
times faster than fp32. The setting is attached to the model (:func:`set_compute_dtype`), so the trainer's
forward/backward, the frozen KL reference and the HF engine's generation all read the same one from the
module they run (:func:`autocast_for`) without threading a parameter through every call.

A model without the attribute keeps the historical behaviour: bf16 autocast for a float32 model on a GPU,
fp32 on CPU.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, get_args

import torch

from memtrain.config import ComputeDtype

COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
_ATTR = "_memtrain_compute_dtype"

# /proc/cpuinfo flags of CPUs whose bf16 matmuls are fast: x86 AMX / AVX512-BF16, Arm's BF16 extension
_FAST_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 "flags", Arm "Features"
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (detected at run time: /proc/cpuinfo, else torch's probes)."""
    if _cpuinfo_flags() & _FAST_BF16_FLAGS:
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def has_fast_bf16(device: str | torch.device) -> bool:
    """bf16 is fast on ``device``: a CUDA GPU with native bf16 (no emulation), or a CPU with bf16 units."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_compute_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto`` -> bf16 where ``device`` runs it fast (:func:`has_fast_bf16`), else fp32."""
    if name == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"compute dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return table[name]


def compute_dtype_name(name: str, device_setting: str = "auto") -> str:
    """The compute dtype ``name`` resolves to on the device ``model.device`` names (``auto``: CUDA if
    present), as a string for run records: ``auto`` means different things on different machines."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device_setting == "auto" else device_setting
    return str(resolve_compute_dtype(name, device)).removeprefix("torch.")


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Attach the compute dtype to ``model`` (read by :func:`autocast_for` in the update and the engine)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"compute dtype {dtype}: expected torch.float32 or torch.bfloat16")
    object.__setattr__(model, _ATTR, dtype)  # a plain attribute, not a buffer/parameter


def compute_dtype_of(model: torch.nn.Module) -> torch.dtype | None:
    """The compute dtype attached to ``model``, or None (historical default, see the module docstring)."""
    return getattr(model, _ATTR, None)


def _weights(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``model``'s matmuls autocast to, or None (they run in the weights' own dtype).

    Autocast only applies to float32 weights: a model loaded in bf16/fp16 already computes in that dtype.
    """
    device, weights = _weights(model)
    if weights != torch.float32 or device.type not in ("cpu", "cuda"):
        return None
    dtype = compute_dtype_of(model)
    if dtype is None:  # not configured: bf16 on a GPU, fp32 on CPU (the behaviour before model.compute_dtype)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return None if dtype == torch.float32 else dtype


def autocast_for(model: torch.nn.Module) -> AbstractContextManager[Any]:
    """bf16 autocast over float32 master weights where ``model``'s compute dtype says so, else nothing.

    Weights that require grad are cast once per outermost autocast region and cached there (torch's autocast
    cache), so a whole generate call or micro-batch pays one cast; frozen weights are cast per op.
    """
    dtype = autocast_dtype(model)
    if dtype is None:
        return nullcontext()
    device, _ = _weights(model)
    return torch.autocast(device.type, dtype=dtype)
