"""Optimizer, learning-rate schedule and LoRA wrapping for the GRPO trainer (paper: AdamW, lr 1e-6 with 20
warm-up steps then constant, weight decay 0.01, grad clip 1.0), and the optimizer step that undoes itself when
it made a weight non-finite or moved the weights too far (``step_or_undo``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from memtrain.config import LoraConfig, OptimConfig
from memtrain.log import logger
from memtrain.rl.distributed import DistContext


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that receive updates: all of them (full fine-tuning) or only the adapters (LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on all of them (as verl does)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters (all requires_grad=False)")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """LR factor for optimizer step ``s`` (0-based): (s + 1) / warmup_steps during warm-up, then 1.

    Unlike ``get_constant_schedule_with_warmup`` the first step is not taken at lr 0 (a wasted batch).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then constant; step it once per optimizer step. Its state_dict resumes the count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(warmup_steps))


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> Any:
    """Wrap ``model`` in peft LoRA adapters (only they train; B starts at 0, so the policy starts = base).

    The reference policy for the KL term is then the same model under ``model.disable_adapter()``: no second
    copy of the weights in memory.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


# --- the optimizer step, undone when it breaks the weights --------------------------------------------

_warned_low_precision: set[int] = set()


def warn_low_precision(params: list[torch.nn.Parameter], lr: float) -> None:
    """bf16/fp16 trainable weights silently drop updates below their resolution (lr ~1e-6): say so once."""
    low = {str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)}
    if low and id(params[0]) not in _warned_low_precision:
        _warned_low_precision.add(id(params[0]))
        logger.warning("trainable weights are %s: AdamW steps of size lr=%g are mostly below their "
                       "resolution and get rounded away; load the policy in float32 (model.dtype=float32) "
                       "and let model.compute_dtype run the matmuls in bf16", "/".join(sorted(low)), lr)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# Finite gradients do not guarantee finite weights: a huge (finite) lr, or AdamW's normalised step on a weight
# already near the float limit, overflows. The step is undone from a copy of the trainable state (weights +
# optimizer moments) taken just before it: free for LoRA, but for full fine-tuning it doubles that state's
# memory, so above this many bytes no copy is kept and such a step stops the run instead
# (:class:`NonFiniteParamsError`) before anything is saved; the last checkpoint stays good either way. (The
# update cannot be predicted from lr * grad: AdamW normalises the gradient, so only the result tells.)
SNAPSHOT_MAX_BYTES = 2 * 1024**3


class NonFiniteParamsError(RuntimeError):
    """The optimizer step made a weight non-finite and no copy was kept to undo it (SNAPSHOT_MAX_BYTES)."""


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: Tensor) -> int:
    return _local(t).numel() * _local(t).element_size()


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element is finite, with one device sync: the max-abs norm is inf/nan exactly when some
    element is (unlike the 2-norm, it cannot overflow on large finite weights)."""
    local = [_local(t).detach() for t in tensors if _local(t).numel()]
    if not local:
        return True
    norms = torch._foreach_norm(local, math.inf)
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


@dataclass
class _Snapshot:
    """Copies of the stepped weights and of the optimizer state, to undo one optimizer step exactly."""

    params: list[torch.nn.Parameter]
    values: list[Tensor]
    state: dict[Any, dict[str, Any]]

    @classmethod
    def take(cls, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             max_bytes: int | None) -> _Snapshot | None:
        size = sum(_nbytes(p) for p in params) + sum(
            _nbytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor))
        if max_bytes is not None and size > max_bytes:
            return None
        state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                     for k, v in st.items()} for p, st in optimizer.state.items()}
        return cls(params, [p.detach().clone() for p in params], state)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values, strict=True):
                p.copy_(v)
        for p in [p for p in optimizer.state if p not in self.state]:  # state the step created
            del optimizer.state[p]
        for p, st in self.state.items():
            optimizer.state[p] = st


def clip_gradients(params: list[torch.nn.Parameter], grad_clip: float | None) -> float:
    """Clip the gradients' global norm to ``grad_clip`` (None: no clipping); returns the norm before."""
    max_norm = grad_clip if grad_clip is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: a DTensor
    if not math.isfinite(grad_norm):
        logger.warning("non-finite gradient norm (%s); skipping this update", grad_norm)
    return grad_norm


def _norm(tensors: Sequence[Tensor]) -> float:
    """The global 2-norm of this rank's (local shards of the) tensors, in float64."""
    local = [_local(t).detach() for t in tensors if _local(t).numel()]
    if not local:
        return 0.0
    return math.sqrt(sum(float(n.double()) ** 2 for n in torch._foreach_norm(local, 2.0)))


def _update_ratio(stepped: list[torch.nn.Parameter], before: float, snapshot: _Snapshot | None) -> float:
    """||theta_new - theta_old|| / ||theta_old|| of one step; without a copy of the old weights, the lower
    bound | ||theta_new|| - ||theta_old|| | / ||theta_old|| (an explosion still shows in it)."""
    if snapshot is not None:  # one parameter's difference at a time: never a second copy of all the weights
        delta = math.sqrt(sum(_norm([_local(p).detach() - _local(v)]) ** 2
                              for p, v in zip(stepped, snapshot.values, strict=True)))
    else:
        delta = abs(_norm(stepped) - before)
    return delta / before if before > 0 else math.inf if delta > 0 else 0.0


def step_or_undo(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], dp: DistContext | None,
                  snapshot_max_bytes: int | None, max_update_ratio: float | None = None
                  ) -> tuple[bool, str, float]:
    """Take the optimizer step, and undo it if it made a weight non-finite or moved the weights by more than
    ``max_update_ratio`` of their norm; returns (kept, why not: 'nonfinite', 'exploded' or '', the ratio)."""
    stepped = [p for p in params if p.grad is not None]
    snapshot = _Snapshot.take(stepped, optimizer, snapshot_max_bytes)
    before = _norm(stepped)
    ratio = math.nan
    try:
        optimizer.step()
        finite = _all_finite(stepped)
    except RuntimeError as exc:  # torch's own overflow check on a huge lr, after the moments moved
        if "overflow" not in str(exc):
            if snapshot is not None:
                snapshot.restore(optimizer)
            raise
        finite = False
    if finite:
        ratio = _update_ratio(stepped, before, snapshot)
    exploded = finite and max_update_ratio is not None and not ratio <= max_update_ratio
    if dp is not None:  # FSDP2: each rank checked its own shards; all ranks undo (or keep) the step
        finite = dp.max_int(0 if finite else 1) == 0
        exploded = finite and dp.max_int(1 if exploded else 0) == 1
    if finite and not exploded:
        return True, "", ratio
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    what = ("made some weights non-finite" if not finite else
            f"moved the weights by {ratio:.3g} of their norm (optim.max_update_ratio {max_update_ratio:g})")
    if snapshot is None:
        size, limit = sum(_nbytes(p) for p in stepped) / 2**30, (snapshot_max_bytes or 0) / 2**30
        raise NonFiniteParamsError(
            f"the optimizer step (lr {lr:g}) {what}, and no copy was kept to undo it (trainable state above "
            f"{limit:g} GiB, weights alone {size:.2f} GiB); lower optim.lr")
    snapshot.restore(optimizer)
    logger.warning("the optimizer step (lr %g) %s; undone, skipping this update", lr, what)
    return False, "nonfinite" if not finite else "exploded", ratio
