"""Perplexity by Hugging Face's fixed-length sliding-window method.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the
tokens that no earlier window scored (the last `end - prev_end` of it), with the rest as
context. The first token of the text is never scored (nothing predicts it). The window loop
takes any `logits_fn(input_ids) -> logits`, so PyTorch and ONNX Runtime models are measured
by the same code. `compare` walks the same windows with two models and measures how far one's
next-token distributions are from the other's (KL divergence, top-1 agreement): the figure
that shows what quantization or distillation changed, where perplexity differences are
smaller than their noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .device import device_of
from .progress import progress_bar

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


def scored_windows(tokens: torch.Tensor, max_length: int, stride: int, progress: bool, desc: str):
    """Walk the sliding windows: yield (ids, positions) per window, where `ids` (1, T) is the
    window and `positions` the slice of its logits that predicts a token no earlier window
    scored; `ids[0, positions.start + 1 : positions.stop + 1]` are those tokens."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() < 2:
        raise ValueError(f"{desc} needs at least 2 tokens, got {tokens.numel()}; give more text")
    windows = sliding_windows(tokens.numel(), max_length, stride)
    for begin, end, n_target in progress_bar(windows, desc=desc, unit="window", enabled=progress):
        ids = tokens[begin:end][None]
        # Position t predicts token t+1: score targets in the last n_target positions.
        n_target = min(n_target, end - begin - 1)
        yield ids, slice(end - begin - n_target - 1, end - begin - 1)


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    max_length: int,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a 1-D token sequence. stride defaults to max_length // 2."""
    stride = stride or max(1, max_length // 2)
    nll_sum: torch.Tensor | float = 0.0
    n_scored = 0
    n_windows = 0
    for ids, pos in scored_windows(tokens, max_length, stride, progress, "perplexity"):
        logits = logits_fn(ids)[0]  # (T, V), on whatever device the model runs on
        # The sum stays on the model's device: one host sync at the end, not one per window.
        nll_sum = nll_sum + window_nll(logits[pos], ids[0, pos.start + 1 : pos.stop + 1])
        n_scored += pos.stop - pos.start
        n_windows += 1
    nll = float(nll_sum) / n_scored
    return PerplexityResult(math.exp(nll), nll, n_scored, n_windows, max_length, stride)


def window_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (float64, on the logits' device) of `target` (N,) under
    `logits` (N, V). The targets are moved to the logits: a model on a GPU scores token ids
    that were read on the CPU."""
    return F.cross_entropy(logits.float(), target.to(logits.device), reduction="sum").double()


@dataclass
class ComparisonResult:
    """How far a model's next-token distributions are from a reference model's on the same
    text: the measure of what compression cost that perplexity alone hides (a model can lose
    perplexity on some tokens and gain it on others and still score the same)."""

    perplexity: float
    reference_perplexity: float
    kl_mean: float  # mean KL(reference || model) per scored token, nats
    kl_median: float
    kl_p99: float
    top1_agreement: float  # share of tokens where both models rank the same token first
    tokens: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per row of (N, V) logits, in nats."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    return (ref.exp() * (ref - F.log_softmax(logits.float(), dim=-1))).sum(dim=-1).clamp(min=0)


@torch.no_grad()
def compare_models(
    logits_fn: LogitsFn,
    reference_fn: LogitsFn,
    tokens: torch.Tensor,
    max_length: int,
    stride: int | None = None,
    progress: bool = False,
) -> ComparisonResult:
    """Perplexity of both models and the KL divergence of the model's predictions from the
    reference's, over the same sliding windows (`perplexity`'s scored positions)."""
    stride = stride or max(1, max_length // 2)
    nll = [0.0, 0.0]
    kls: list[torch.Tensor] = []
    agree = 0
    for ids, pos in scored_windows(tokens, max_length, stride, progress, "compare"):
        logits = logits_fn(ids)[0].float()[pos]
        ref = reference_fn(ids)[0].float()[pos]
        if logits.shape != ref.shape:
            raise ValueError(f"the models disagree on the vocabulary: logits {tuple(logits.shape)} vs "
                             f"reference {tuple(ref.shape)}; compare models that share a tokenizer")
        target = ids[0, pos.start + 1 : pos.stop + 1]
        ref = ref.to(logits.device)  # the two models may run on different devices
        nll[0] += float(window_nll(logits, target))
        nll[1] += float(window_nll(ref, target))
        kls.append(token_kl(ref, logits).cpu())
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
    kl = torch.cat(kls).double().numpy()
    n = kl.size
    return ComparisonResult(
        math.exp(nll[0] / n), math.exp(nll[1] / n), float(kl.mean()), float(np.median(kl)),
        float(np.percentile(kl, 99)), agree / n, n, max_length, stride,
    )


def model_logits_fn(model: torch.nn.Module, device: str | torch.device | None = None) -> LogitsFn:
    """ids (B, T) on any device -> the model's logits, computed on `device` (default: where
    the model's parameters are)."""
    model.eval()
    device = device if device is not None else device_of(model)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device)).logits

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
            logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)
