"""Activation-based importance of blocks, attention heads, MLP neurons and embedding channels.

Following Minitron (Muralidharan et al., 2024), importance comes from activations over a few
calibration batches, not from weights:

- attention head: the RMS norm of the head's output (the input of `attn.c_proj`, per head);
- MLP neuron: the RMS of its activation (the input of `mlp.c_proj`);
- embedding channel: the RMS of the channel in every LayerNorm output (ln_1, ln_2 of every
  block and ln_f), summed: the LayerNorms read the residual stream in every block;
- block (depth): either the loss increase when the block is skipped ("loss"), or the Block
  Influence of ShortGPT, the mean 1 - cos(input, output) of the block ("cosine").

The per-batch statistics are sums of squares (pure functions below), so batches of any size
accumulate exactly. One calibration pass with forward hooks gathers all of them; it also
gathers the per-input-column sums of squares of every block projection that Wanda needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from compactgpt.device import device_of
from compactgpt.model import GPT
from compactgpt.progress import progress_bar

# ---------------------------------------------------------------------------------------
# Pure statistics


def channel_square_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum over all positions of x**2 per last-dimension channel: (..., C) -> (C,)."""
    return x.detach().float().pow(2).flatten(0, -2).sum(0)


def head_square_sums(y: torch.Tensor, n_head: int) -> torch.Tensor:
    """Sum over positions of each head's squared output norm: (..., nh * hs) -> (nh,)."""
    y = y.detach().float()
    per_head = y.reshape(*y.shape[:-1], n_head, y.shape[-1] // n_head)
    return per_head.pow(2).sum(-1).flatten(0, -2).sum(0)


def cosine_influence_sum(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over positions of 1 - cos(x_in, x_out): ShortGPT's Block Influence, unnormalised.
    A block that barely turns the residual stream scores near 0."""
    cos = F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
    return (1.0 - cos).sum()


def rms(square_sum: torch.Tensor, count: int) -> torch.Tensor:
    return (square_sum / max(count, 1)).sqrt()


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, in ascending index order (so kept units keep their
    order). Ties go to the lower index, which makes "keep everything" the identity."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    scores = scores.detach().cpu()  # one copy, not one device read per unit
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


# ---------------------------------------------------------------------------------------
# Calibration


@dataclass
class ActivationStats:
    """Sums of squares gathered over calibration batches; `tokens` positions in all."""

    tokens: int = 0
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (nh,)
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n_inner,)
    channels: torch.Tensor | None = None  # (C,), summed over every LayerNorm output
    influence: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sum of 1 - cos (float64)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> (in,) for Wanda

    def head_scores(self, layer: int) -> torch.Tensor:
        return rms(self.heads[layer], self.tokens)

    def neuron_scores(self, layer: int) -> torch.Tensor:
        return rms(self.neurons[layer], self.tokens)

    def channel_scores(self) -> torch.Tensor:
        return self.channels / max(self.tokens, 1)  # sum of per-LayerNorm mean squares

    def cosine_scores(self) -> torch.Tensor:
        # float64 sums divided, then float32: the figures a Python float sum gave.
        sums = torch.stack([self.influence[i].cpu() for i in sorted(self.influence)])
        return (sums / max(self.tokens, 1)).float()

    def input_norms(self, name: str) -> torch.Tensor:
        """||X_j||_2 over all calibration positions, per input column j (Wanda's statistic)."""
        return self.inputs[name].sqrt()


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The four projections of every block, by their GPT-2 name."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"transformer.h.{i}.{name}"] = block.get_submodule(name)
    return out


def _add(store: dict, key, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


@torch.no_grad()
def collect_stats(model: GPT, batches: Iterable[torch.Tensor], linear_inputs: bool = False,
                  progress: bool = False) -> ActivationStats:
    """One pass over calibration batches (each (B, T) token ids) with forward hooks.

    linear_inputs also gathers the per-column input sums of squares of every block linear
    (for Wanda). The model is left unchanged and its hooks removed, even on error.
    """
    stats = ActivationStats()
    n_head = model.config.n_head
    handles = []

    def on_ln(module, args, output):
        s = channel_square_sums(output)
        stats.channels = s if stats.channels is None else stats.channels + s

    for i, block in enumerate(model.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, args, i=i: _add(stats.heads, i, head_square_sums(args[0], n_head))))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(
            lambda m, args, i=i: _add(stats.neurons, i, channel_square_sums(args[0]))))
        # Summed as a float64 tensor on the model's device: no host sync per block and batch.
        handles.append(block.register_forward_hook(
            lambda m, args, out, i=i: _add(stats.influence, i, cosine_influence_sum(args[0], out[0]).double())))
        handles.append(block.ln_1.register_forward_hook(on_ln))
        handles.append(block.ln_2.register_forward_hook(on_ln))
    # ln_f too: it feeds the LM head. Every LayerNorm sees the same positions, so each one
    # weighs equally in the summed mean squares.
    handles.append(model.transformer.ln_f.register_forward_hook(on_ln))
    if linear_inputs:
        for name, lin in block_linears(model).items():
            handles.append(lin.register_forward_pre_hook(
                lambda m, args, name=name: _add(stats.inputs, name, channel_square_sums(args[0]))))
    was_training = model.training
    model.eval()
    device = device_of(model)  # batches are drawn on the CPU; the model may be on a GPU
    try:
        for ids in progress_bar(list(batches), desc="calibrate", unit="batch", enabled=progress):
            model(ids.to(device))
            stats.tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


@torch.no_grad()
def forward_skipping(model: GPT, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """Logits of the model with the blocks in `skip` removed (their residual passes through).
    `ids` may be on any device; the logits are on the model's."""
    ids = ids.to(device_of(model))
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None]
    x = model.transformer.wte(ids) + model.transformer.wpe(pos)
    for i, block in enumerate(model.transformer.h):
        if i not in skip:
            x, _ = block(x)
    return model.lm_head(model.transformer.ln_f(x))


@torch.no_grad()
def skip_losses(model: GPT, batches: list[torch.Tensor], progress: bool = False) -> tuple[float, torch.Tensor]:
    """Mean next-token loss of the full model, and of the model with each block skipped in
    turn: (base, (n_layer,)). The increase is the block's importance by loss."""
    was_training = model.training
    model.eval()

    def loss_with(skip: set[int]) -> float:
        total, count = 0.0, 0
        for ids in batches:
            ids = ids.to(device_of(model))
            logits = forward_skipping(model, ids, skip)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        return total / max(count, 1)

    layers = progress_bar(range(model.config.n_layer), desc="depth", unit="block", enabled=progress)
    try:
        base = loss_with(set())
        losses = torch.tensor([loss_with({i}) for i in layers])
    finally:
        model.train(was_training)
    return base, losses


# How --depth-metric scores blocks: higher means more important.
DepthMetric = Callable[[GPT, list[torch.Tensor], ActivationStats, bool], torch.Tensor]


def _depth_by_loss(model, batches, stats, progress):
    base, losses = skip_losses(model, batches, progress)
    return losses - base


def _depth_by_cosine(model, batches, stats, progress):
    return stats.cosine_scores()


DEPTH_METRICS: dict[str, DepthMetric] = {"loss": _depth_by_loss, "cosine": _depth_by_cosine}
