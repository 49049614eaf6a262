"""AWQ (activation-aware weight quantization): pure search functions.

Weights that meet large activations matter most. Scaling input channel j of a weight by
s_j (and its input by 1/s_j, folded into the previous LayerNorm or projection) keeps the float
function but gives those channels a finer grid. `search_scales_through` tries s = mean|x|^a / mean|w|^(1-a)
for a on a grid, plus the identity (so the search never does worse than round-to-nearest on
the calibration data), and keeps the one whose quantized *module* output (the attention or
the MLP the layer feeds, not just the layer) is closest to the float output.
`search_clip` then shrinks each group's range where clipping a few large weights lowers the
output error of that group.
"""

from __future__ import annotations

import torch

from .rtn import fake_quantize, grid_params, group_ranges, rtn_quantize
from .format import QuantizedWeight


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                         clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """w (out, in) rounded group-wise to its grid and mapped back to float."""
    out_f, in_f = w.shape
    lo, hi = group_ranges(w, group_size, clip)
    scale, zero = grid_params(lo, hi, bits, symmetric)
    g = w.reshape(out_f, in_f // group_size, group_size)
    return fake_quantize(g, scale[..., None], zero[..., None], bits).reshape(out_f, in_f)


def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, symmetric: bool, n_grid: int
) -> tuple[torch.Tensor, float, float]:
    """Per-input-channel scales s (in,) for weights that share the input x (N, in).

    Returns s, the chosen exponent, and the relative output error at it.
    """
    x = x.float()
    W = torch.cat([w.float() for w in weights], dim=0)  # layers sharing x are judged together
    ref = x @ W.T
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for a, s in candidate_scales(x_mean, None, n_grid):
        Wq = fake_quantize_groups(W * s, bits, group_size, symmetric) / s
        err = (x @ Wq.T - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2], best[0] / max(ref.pow(2).mean().item(), 1e-30)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int):
    """(exponent, s) candidates: s = mean|x|^a (/ mean|w|^(1-a) when w_mean is given), a on
    a grid in [0, 1); the identity comes first so a search can only improve on it."""
    yield 0.0, torch.ones_like(x_mean)
    for k in range(1, n_grid):
        a = k / n_grid
        s = x_mean.pow(a)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - a) + 1e-4)
        s = s.clamp(min=1e-4)
        yield a, s / (s.max() * s.min()).sqrt()  # keep scales centred around 1


def normalized_weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| relative to its group's max|W|, per input channel."""
    W = torch.cat([w.detach().float() for w in weights], dim=0)
    out_f, in_f = W.shape
    g = W.abs().reshape(out_f, in_f // group_size, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(out_f, in_f).mean(dim=0)


@torch.no_grad()
def search_scales_through(
    x: torch.Tensor, forward, params: list[torch.nn.Parameter], bits: int, group_size: int, symmetric: bool,
    n_grid: int, duo: bool = True,
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales for the weights `params` that read x (..., in), judged by the
    output of `forward(x)`, the module whose output the scaled layers feed (attention, MLP).

    Each candidate temporarily replaces every weight W by Q(W * s) / s, the function the
    scaled, quantized layers compute on the unscaled input. Returns s and its exponent.
    """
    originals = [p.detach().clone() for p in params]
    ref = forward(x)
    x_mean = x.reshape(-1, x.shape[-1]).abs().mean(dim=0).clamp(min=1e-8)
    w_mean = normalized_weight_mean(originals, group_size) if duo else None
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    try:
        for a, s in candidate_scales(x_mean, w_mean, n_grid):
            for p, w in zip(params, originals):
                p.copy_(fake_quantize_groups(w * s, bits, group_size, symmetric) / s)
            err = (forward(x) - ref).pow(2).mean().item()
            if err < best[0]:
                best = (err, s, a)
    finally:
        for p, w in zip(params, originals):
            p.copy_(w)
    return best[1], best[2]


def search_clip(
    x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int,
    max_shrink: float, fixed_rows: int = 0,
) -> QuantizedWeight:
    """Quantize w (out, in) with a clipping ratio per (row, group) chosen to minimize the
    group's output error on inputs x (N, in). The first `fixed_rows` rows keep the full range
    (attention queries and keys, whose errors softmax amplifies)."""
    x = x.float()
    w = w.float()
    out_f, in_f = w.shape
    groups = in_f // group_size
    if max_shrink <= 0:
        return rtn_quantize(w, bits, group_size, symmetric)
    xg = x.reshape(-1, groups, group_size)  # (N, G, gs)
    best_err = torch.full((out_f, groups), float("inf"))
    best_ratio = torch.ones(out_f, groups)
    wg = w.reshape(out_f, groups, group_size)
    for k in range(n_grid):
        ratio = 1.0 - max_shrink * k / n_grid
        d = (w - fake_quantize_groups(w, bits, group_size, symmetric, ratio)).reshape(out_f, groups, group_size)
        # Output error of each group's contribution, averaged over the inputs: (out, G).
        err = torch.einsum("ngk,ogk->ogn", xg, d).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    del wg
    best_ratio[:fixed_rows] = 1.0
    return rtn_quantize(w, bits, group_size, symmetric, clip=best_ratio)
