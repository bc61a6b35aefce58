"""AdamW with CLIP's weight-decay exclusions, the cosine schedule with linear warm-up, and the
logit-scale clamp.

Weight decay applies to the weight matrices only. Excluded (decay 0): every parameter with
fewer than 2 dimensions (norm weights, biases, the lambda vectors ``lambda_*``, the 0-dim
``logit_scale``), and the embeddings whatever their shape (``token_embedding``,
``positional_embedding``, ``pos_embed``, ``cls_token``, ``class_embedding``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Adam moments as in CLIP / open_clip for ViTs.
BETAS = (0.9, 0.98)
EPS = 1e-6
# CLIP clamps the temperature multiplier exp(logit_scale) at 100.
MAX_LOGIT_SCALE = 100.0

_NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "pos_embed", "cls_token",
                   "class_embedding", "logit_scale")


def exclude_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for the parameters trained without weight decay (see the module docstring)."""
    parts = name.split(".")
    return (param.dim() < 2 or any(part in _NO_DECAY_NAMES for part in parts)
            or parts[-1].startswith("lambda_"))


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW parameter groups: [{decayed params, weight_decay}, {the rest, 0.0}] (trainable
    parameters only, in the model's order)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas BETAS, eps EPS) over ``parameter_groups(model, weight_decay)``; the fused
    implementation when every parameter is a CPU or CUDA float tensor (on the CPU it is several
    times faster than the default, e.g. over a large token embedding)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    fused = all(param.device.type in ("cpu", "cuda") and param.is_floating_point()
                for param in model.parameters())
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=BETAS, eps=EPS,
                             fused=fused)


def cosine_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of optimizer step ``step`` (from 0): (step + 1) / warmup during the
    warm-up, then a cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR with ``cosine_multiplier``; call ``step()`` after every optimizer step.

    The peak learning rate is each group's ``initial_lr`` (set from its ``lr`` when missing).
    ``start_step`` > 0 starts the schedule at that optimizer step (a resumed run): the groups'
    lr become ``initial_lr * cosine_multiplier(start_step, ...)`` at once, exactly the value an
    uninterrupted run has there. The schedule is a function of the step and of the arguments,
    so a resumed run needs no saved scheduler state.
    """
    if warmup_steps < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {warmup_steps}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")

    def multiplier(step: int) -> float:
        return cosine_multiplier(start_step + step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def set_peak_lr_and_weight_decay(optimizer: torch.optim.Optimizer, lr: float,
                                 weight_decay: float) -> None:
    """Make ``lr`` the peak learning rate (``initial_lr``) of every group and ``weight_decay``
    the decay of the decayed group (the first, see ``parameter_groups``): after loading a saved
    optimizer state, whose groups carry the saved run's values."""
    decayed, _ = optimizer.param_groups
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    decayed["weight_decay"] = weight_decay


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp the log-temperature parameter in place to [0, ln(MAX_LOGIT_SCALE)] (after each
    optimizer step, as CLIP does)."""
    model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
