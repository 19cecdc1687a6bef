"""AdamW with PMC-CLIP/OpenCLIP parameter groups and the learning-rate schedule.

The schedule is a pure function of the global optimizer step, so a resumed run needs no
scheduler state: `lr_at_step(step)` is the same number whether the run was interrupted
or not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pmc_clip.config import OptimConfig


def is_decayed(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay on matrices and convolutions only: not on biases, norms (all 1-D),
    the logit scale, or the special-token/position embeddings of the fusion input."""
    no_decay_names = ("logit_scale", "img_special_token", "positional_embedding")
    return parameter.ndim >= 2 and not any(n in name for n in no_decay_names)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # checkpoint-compat parameters the forward never uses
        (decay if is_decayed(name, parameter) else no_decay).append(parameter)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": config.weight_decay},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )


def lr_at_step(step: int, config: OptimConfig, *, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at
    `total_steps`. `step` counts optimizer steps from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
