"""What a stage plugs into the loop: a source of batches and a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ..data import TokenShards


class BatchSource(Protocol):
    """Anything that draws a training batch (a tuple of tensors) with a torch.Generator."""

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]: ...


LossFn = Callable[[nn.Module, tuple], tuple[torch.Tensor, int]]


@dataclass
class WindowBatches:
    """Random (x, y) windows of a token split."""

    shards: TokenShards
    batch_size: int
    block_size: int

    def next_batch(self, generator: torch.Generator):
        return self.shards.sample(self.batch_size, self.block_size, generator)


def lm_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; returns the mean loss and the number of target tokens.
    The model computes it from its last hidden states chunk by chunk (GPT.forward's
    `targets`), so the (B, T, V) float logits are never held in memory."""
    x, y = batch
    return model(x, targets=y).loss, y.numel()
