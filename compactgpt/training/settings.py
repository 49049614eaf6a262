"""LoopConfig: the optimizer, schedule and bookkeeping settings every training stage shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import StageConfig, option
from ..device import DEVICE_HELP
from ..errors import ConfigError


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class LoopConfig(StageConfig):
    """Optimizer, schedule and bookkeeping settings every training stage shares."""

    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-step per process")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "final learning rate (floor of the cosine decay)")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and embeddings, not biases or LayerNorm)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max gradient norm (0: off)")
    eval_interval: int = option(200, "steps between validations (and at the end)")
    checkpoint_interval: int = option(200, "steps between checkpoints (and at the end)")
    log_interval: int = option(10, "steps between log lines")
    seed: int = option(1337, "random seed (weights and batches)")
    # Where a stage runs, not what it writes: unsaved, so a run's manifest is the same on any device.
    device: str = option("auto", DEVICE_HELP, saved=False)
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option(
        "auto", "how torchrun's processes share the model: ddp (a full copy on each), fsdp (parameters, gradients "
        "and optimizer state sharded: for models whose training does not fit one GPU), auto (ddp). With one "
        "process, every choice trains unsharded",
        saved=False)  # where a stage runs, not what it writes: checkpoints resume across it
    nan_skips: int = option(
        0, "steps with a non-finite loss or gradient norm to skip (their update is dropped) before training "
        "stops as diverged", saved=False)  # a safety margin, not a setting of the model written

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nan_skips < 0:
            raise ConfigError(f"nan_skips must be 0 or more, got {self.nan_skips}")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            # inf or nan would pass the comparisons below and only show as NaN weights later.
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"learning rate settings are inconsistent: lr={self.lr}, min_lr={self.min_lr}, "
                f"warmup_steps={self.warmup_steps}; need 0 <= min_lr <= lr, lr > 0, warmup_steps >= 0"
            )
        if self.weight_decay < 0 or self.grad_clip < 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(
                f"optimizer settings out of range: weight_decay={self.weight_decay}, grad_clip={self.grad_clip}, "
                f"beta1={self.beta1}, beta2={self.beta2}; need weight_decay >= 0, grad_clip >= 0 (0: off), "
                "0 <= beta1, beta2 < 1"
            )
        # AdamW moves a weight by up to lr / (1 - beta1) in its first step and scales it by
        # 1 - lr * weight_decay: factors torch cannot even turn into float32 are refused here,
        # not met as a RuntimeError mid-step. (Large but representable ones diverge cleanly.)
        if self.beta1 < 1 and max(self.lr / (1 - self.beta1), self.lr * self.weight_decay) >= FLOAT32_MAX:
            raise ConfigError(f"lr={self.lr} is too large for float32 weights (AdamW's step overflows); "
                              "use a far smaller --lr")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
