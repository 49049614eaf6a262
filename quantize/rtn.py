"""Round-to-nearest quantization: the affine integer grid that every method shares.

Pure functions on tensors. A group of weights with range [lo, hi] gets a step (scale) and a
zero point; a weight w becomes the code clamp(round(w / scale) + zero, 0, 2**bits - 1).
Symmetric grids fix the zero point at 2**(bits-1) and span [-max|w|, max|w|]; asymmetric
grids span [min(w, 0), max(w, 0)]. Scales are rounded *up* to the nearest float16 value so the
GPTQ checkpoint layout (float16 scales) stores them exactly and no weight moves more than
half a step. With `gguf_exact` an asymmetric 4-bit grid also keeps step x zero point exact in
float16 (`fp16_exact_step`): llama.cpp's Q4_1 block stores that product, as an fp16 minimum,
beside the fp16 step, so the GGUF file then holds the very weights that were evaluated.

`_rtn` at the end, registered for RTNConfig, rounds every projection of a GPT this way.
"""

from __future__ import annotations

import torch

from .config import RTNConfig
from .format import QuantizedWeight
from .gptq_layout import GPTQ_LAYOUT
from .handlers import each_projection, quantize_embeddings, register_handler, register_layout, replace_linear
from .kquant import Q6_K_BITS, q6_k_quantize


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16-representable value >= x (x positive, float32)."""
    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h).float()


def _fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Where x (float32) is a finite value float16 holds exactly."""
    return x.to(torch.float16).float() == x


def fp16_exact_step(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The smallest step >= scale (positive float32, any shape) such that the step and
    step x zero (zero: integral, same shape) are both exact in float16.

    float16 has 11 significant bits, so a zero point whose odd part has b bits leaves the step
    about 11 - b of them: the step's mantissa is rounded up to the most bits that work (all
    11, the step itself, when fp16 holds the product already; zero points that are powers of
    two cost nothing). A power of two always works, so only a product past float16's range
    leaves the step unchanged (and inexact).
    """
    scale = scale.float()
    zero = zero.to(scale.dtype)
    found = _fp16_exact(scale) & _fp16_exact(scale * zero)
    step = scale.clone()
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    for digits in range(10, 0, -1):
        if bool(found.all()):
            break
        candidate = torch.ldexp(torch.ceil(mantissa * 2**digits), exponent - digits)
        fits = ~found & _fp16_exact(candidate) & _fp16_exact(candidate * zero)
        step = torch.where(fits, candidate, step)
        found |= fits
    return step


def grid_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                gguf_exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float, integral) for ranges [lo, hi] (any shape).

    The scale is always float16-exact. gguf_exact: an asymmetric 4-bit grid also makes scale x
    zero float16-exact (`fp16_exact_step`; the step only widens, with the zero point chosen for
    the unwidened step, so the grid still spans [lo, hi]); symmetric zero points are powers of
    two, whose products with an fp16 scale are exact already.
    """
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
        # Only a 4-bit grid: Q4_1 is the one llama.cpp block that stores scale x zero point, and
        # asymmetric int8 (no GGUF block at all) would give up to 8 of the step's 11 bits to
        # its zero points.
        if gguf_exact and bits == 4:
            scale = fp16_exact_step(scale, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w on the grid (scale, zero), broadcast elementwise; returned as float. A zero
    step (a K-quant sub-block of zeros) gives the zero point."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, zero + 0 * w, torch.clamp(torch.round(w / safe) + zero, 0, 2**bits - 1))


def stored_bits(bits: int) -> int:
    """The storage width of codes of `bits`: 6-bit codes (Q6_K) are stored and run as 8-bit codes."""
    return 8 if bits == Q6_K_BITS else bits


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to the grid and mapped back to float."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_ranges(w: torch.Tensor, group_size: int, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of w (out, in), scaled by a clipping ratio."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)
    return g.amin(dim=-1) * clip, g.amax(dim=-1) * clip


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: torch.Tensor | float = 1.0,
    gguf_exact: bool = False, importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a float weight (out, in) group-wise; clip (scalar or (out, groups)) shrinks the
    range; gguf_exact as in `grid_params`. bits=6 rounds to llama.cpp's Q6_K grid instead
    (`quantize.kquant`; its own groups of 16, its scale search weighted by `importance`, the
    columns' input energy, where calibration gives one)."""
    if bits == Q6_K_BITS:
        return q6_k_quantize(w, importance)
    w = w.detach().float()
    out_f, in_f = w.shape
    lo, hi = group_ranges(w, group_size, clip)
    scale, zero = grid_params(lo, hi, bits, symmetric, gguf_exact)  # (out, groups)
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
                                                 config.symmetric, gguf_exact=config.gguf_exact))
    if config.include_embeddings:
        w = model.transformer.wte.weight
        quantize_embeddings(model, rtn_quantize(w, config.bits_for("lm_head"), config.group_for(w.shape[1], "lm_head"),
                                                config.symmetric, gguf_exact=config.gguf_exact))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(RTNConfig, GPTQ_LAYOUT)
