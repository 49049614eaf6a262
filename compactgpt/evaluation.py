"""Perplexity by Hugging Face's fixed-length sliding-window method.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the
tokens that no earlier window scored (the last `end - prev_end` of it), with the rest as
context. The first token of the text is never scored (nothing predicts it). The window loop
takes any `logits_fn(input_ids) -> logits`, so PyTorch and ONNX Runtime models are measured
by the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_target) per window: the window is tokens[begin:end] and its last
    n_target positions are scored (one fewer in the first window: token 0 has no prediction)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    max_length: int,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a 1-D token sequence. stride defaults to max_length // 2."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {tokens.numel()}; give more text")
    stride = stride or max(1, max_length // 2)
    windows = sliding_windows(tokens.numel(), max_length, stride)
    nll_sum = 0.0
    n_scored = 0
    iterator = windows
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(windows, desc="perplexity", unit="window", leave=False)
    for begin, end, n_target in iterator:
        ids = tokens[begin:end][None]
        logits = logits_fn(ids)[0].float()  # (T, V)
        # Position t predicts token t+1: score targets in the last n_target positions.
        n_target = min(n_target, end - begin - 1)
        pred = logits[-n_target - 1 : -1]
        target = ids[0, -n_target:]
        nll_sum += F.cross_entropy(pred, target, reduction="sum").double().item()
        n_scored += n_target
    nll = nll_sum / n_scored
    return PerplexityResult(math.exp(nll), nll, n_scored, len(windows), max_length, stride)


def model_logits_fn(model: torch.nn.Module, device: str | torch.device = "cpu") -> LogitsFn:
    model.eval()

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device))

    return fn


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, device, autocast_ctx) -> float:
    """Mean cross-entropy over fixed (x, y) batches (validation during training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)
