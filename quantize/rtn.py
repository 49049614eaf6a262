"""Round-to-nearest quantization: the affine integer grid that every method shares.

Pure functions on tensors. A group of weights with range [lo, hi] gets a step (scale) and a
zero point; a weight w becomes the code clamp(round(w / scale) + zero, 0, 2**bits - 1).
Symmetric grids fix the zero point at 2**(bits-1) and span [-max|w|, max|w|]; asymmetric
grids span [min(w, 0), max(w, 0)]. Scales are rounded *up* to the nearest float16 value so the
GPTQ checkpoint layout (float16 scales) stores them exactly and no weight moves more than
half a step.

`_rtn` at the end, registered for RTNConfig, rounds every projection of a GPT this way.
"""

from __future__ import annotations

import torch

from .config import RTNConfig
from .format import QuantizedWeight
from .gptq_layout import GPTQ_LAYOUT
from .handlers import each_projection, quantize_embeddings, register_handler, register_layout, replace_linear


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16-representable value >= x (x positive, float32)."""
    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h).float()


def grid_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float, integral) for ranges [lo, hi] (any shape)."""
    maxq = 2**bits - 1
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        lo = lo.clamp(max=0)
        hi = hi.clamp(min=0)
        scale = (hi - lo) / maxq
    # An all-zero group still needs a positive step (any code maps back to 0 with the zero point).
    scale = fp16_ceil(torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=2**-24))
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w on the grid (scale, zero), broadcast elementwise; returned as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to the grid and mapped back to float."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_ranges(w: torch.Tensor, group_size: int, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of w (out, in), scaled by a clipping ratio."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)
    return g.amin(dim=-1) * clip, g.amax(dim=-1) * clip


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: torch.Tensor | float = 1.0
) -> QuantizedWeight:
    """Quantize a float weight (out, in) group-wise; clip (scalar or (out, groups)) shrinks the range."""
    w = w.detach().float()
    out_f, in_f = w.shape
    lo, hi = group_ranges(w, group_size, clip)
    scale, zero = grid_params(lo, hi, bits, symmetric)  # (out, groups)
    groups = in_f // group_size
    codes = quantize_codes(
        w.reshape(out_f, groups, group_size), scale[..., None], zero[..., None], bits
    ).reshape(out_f, in_f)
    return QuantizedWeight(bits, group_size, codes.to(torch.uint8), scale, zero.to(torch.uint8))


@register_handler(RTNConfig)
@torch.no_grad()
def _rtn(model, config: RTNConfig, calibration, progress: bool) -> None:
    for name, lin in each_projection(model, "rtn", progress):
        replace_linear(model, name, rtn_quantize(lin.weight, config.bits, config.group_for(lin.in_features, name),
                                                 config.symmetric))
    if config.include_embeddings:
        w = model.transformer.wte.weight
        quantize_embeddings(model, rtn_quantize(w, config.bits_for("lm_head"), config.group_for(w.shape[1], "lm_head"),
                                                config.symmetric))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(RTNConfig, GPTQ_LAYOUT)
