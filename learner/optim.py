"""AdamW and the learning-rate schedule (linear warm-up, then constant or cosine).

The schedule is a pure function of the optimizer step, so a checkpoint only needs the step count to
restore it exactly.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from common.config import LearnerConfig


def lr_at(cfg: LearnerConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up to ``cfg.lr``, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: LearnerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the LR is set per step by ``set_lr``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: with learner.lora.enabled check lora.target_modules")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
