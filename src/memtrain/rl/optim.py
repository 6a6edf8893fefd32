"""Optimizer, learning-rate schedule and LoRA wrapping for the GRPO trainer (paper: AdamW, lr 1e-6 with 20
warm-up steps then constant, weight decay 0.01, grad clip 1.0)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memtrain.config import LoraConfig, OptimConfig


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
