"""The pure pieces of an optimizer step: the learning-rate schedule, AdamW's weight-decay groups
and the clipped global gradient norm."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .settings import LoopConfig


def lr_at(step: int, config: LoopConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; leave biases and LayerNorm gains alone. Frozen
    parameters are left out."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}  # tied weights once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def clipped_grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """The global gradient norm, the gradients clipped to `clip` (0: not clipped). Under FSDP
    the parameters are DTensor shards: clip_grad_norm_ scales them by the global norm and
    returns it as a DTensor, made a plain tensor by full_tensor()."""
    # An infinite bound measures without clipping: the gradients are scaled by exactly 1.
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
