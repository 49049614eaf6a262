"""What a finetuning task hands to the shared stage (see stage.py): the model to train and
how to train, judge and save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..artifacts import LoadedModel
from ..errors import ConfigError
from .config import FinetuneConfig


@dataclass
class TaskRun:
    """A task's part of a finetuning run; built by the task from the config and the parent."""

    model: nn.Module
    batches: object  # a training.BatchSource
    loss_fn: Callable
    evaluate: Callable[[nn.Module], dict]  # quick validation inside the loop
    report: Callable[[nn.Module, str], dict]  # the full held-out report; phase "before" or "after"
    save: Callable[[Path, nn.Module, dict, dict], None]  # (out, model, metrics, extra)
    fingerprint: dict
    train_also: tuple[str, ...] = ()  # modules trained in full under LoRA (new heads)
    extra: dict = field(default_factory=dict)


def task_max_length(config: FinetuneConfig, parent: LoadedModel) -> int:
    """Tokens per example or window: --max-length, else the parent's n_positions. Raises
    ConfigError when --max-length exceeds the parent's positions."""
    n = parent.model.config.n_positions
    if config.max_length is not None and config.max_length > n:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's {n} positions; use {n} or less")
    return config.max_length or n
