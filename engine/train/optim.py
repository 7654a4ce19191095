"""AdamW and the warmup + cosine learning-rate schedule.

Implementation: torch's ``AdamW(fused=True)`` on CUDA — the multi-tensor-apply kernel ported from apex's
``FusedAdam``, which handles FSDP2's DTensor parameters natively (apex's own kernels take raw data pointers and
fail on DTensors, which is all the Trainer ever holds, so apex is not used) — and ``AdamW(foreach=True)`` on CPU.
Weight decay applies to matrices only — biases, norm gains and other 1-D parameters are excluded, as is standard
for transformers. Only parameters with ``requires_grad`` are optimised.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from engine.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ≥2-D with ``weight_decay``, the rest without."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters with ``cfg.lr``, ``betas``, ``eps``, ``weight_decay``."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=on_cuda, foreach=not on_cuda)


class WarmupDecay:
    """lr multiplier at a step: linear warmup from ~0 to 1, then cosine / linear decay to ``min_ratio``, or flat.

    A callable object rather than a closure so that ``LambdaLR.state_dict()`` records its parameters.
    """

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> None:
        if total_steps <= 0:
            raise ValueError(f"schedule needs total_steps > 0, got {total_steps}")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}")
        self.total_steps = total_steps
        self.warmup_steps = min(warmup_steps, total_steps)
        self.schedule = schedule
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """Warmup (``cfg.warmup_ratio`` of ``total_steps``) then ``cfg.schedule`` down to ``cfg.min_lr_ratio * lr``."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return LambdaLR(optimizer, WarmupDecay(total_steps, warmup, cfg.schedule, cfg.min_lr_ratio))
