"""SmoothQuant: migrate activation outliers into the weights, exactly, before int8 rounding.

For a LayerNorm followed by linear layers, dividing the LayerNorm's gain and bias by s and
multiplying the layers' input columns by s leaves the float function unchanged. Choosing
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) flattens the per-channel activation range that
per-token int8 activations cannot represent, at the cost of a (tolerable) wider weight range.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) from per-channel activation maxima (in,) and the weights that read them."""
    w_absmax = torch.cat([w.detach().abs() for w in weights], dim=0).amax(dim=0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5).float()


@torch.no_grad()
def fold_scales(norm: nn.LayerNorm, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the LayerNorm's output by s and multiply the linears' input columns by s."""
    norm.weight.div_(s)
    norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


@torch.no_grad()
def fold_scales_into_values(c_attn: nn.Linear, c_proj: nn.Linear, s: torch.Tensor) -> None:
    """Divide the value rows of a fused q/k/v projection by s and multiply the attention output
    projection's input columns by s: attention mixes values linearly, so the function is kept."""
    width = c_proj.in_features
    c_attn.weight[2 * width :].div_(s[:, None])
    if c_attn.bias is not None:
        c_attn.bias[2 * width :].div_(s)
    c_proj.weight.mul_(s[None, :])
