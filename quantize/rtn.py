"""Round-to-nearest quantization: the affine integer grid that every method shares.

Pure functions on tensors. A group of weights with range [lo, hi] gets a step (scale) and a
zero point; a weight w becomes the code clamp(round(w / scale) + zero, 0, 2**bits - 1).
Symmetric grids fix the zero point at 2**(bits-1) and use every code, llama.cpp's Q4_0 and
Q8_0 rules (`grid_params`), with each group's step searched on its weighted squared error
(`searched_symmetric_grid`); asymmetric grids span [min(w, 0), max(w, 0)], their steps
searched as well (`searched_asymmetric_grid`). Scales are rounded to float16 values so the GPTQ
checkpoint layout (float16 scales) stores them exactly. With
`gguf_exact` an asymmetric 4-bit grid also keeps step x zero point exact in float16
(`fp16_exact_step`): llama.cpp's Q4_1 block stores that product, as an fp16 minimum, beside
the fp16 step, so the GGUF file then holds the very weights that were evaluated.

`_rtn` at the end, registered for RTNConfig, rounds every projection of a GPT this way.
"""

from __future__ import annotations

import torch

from .config import RTNConfig
from .format import QuantizedWeight, quantize_codes, storage_bits
from .gptq_layout import GPTQ_LAYOUT
from .handlers import each_projection, quantize_embeddings, register_handler, register_layout, replace_linear
from .kquant import SIGNED_K, q4_k_quantize, refit_symmetric, signed_k_quantize


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
                gguf_exact: bool = False, full: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float, integral) for ranges [lo, hi] (any shape).

    Symmetric grids put the zero point on the middle code 2**(bits-1). `full` (the default)
    uses every code, as llama.cpp's blocks do: a 4-bit group's signed extreme lands on code 0
    (step = extreme / -8, Q4_0's rule: the step is negative when the extreme is positive), an
    8-bit group's max|w| on codes 1 and 255 (step = max|w| / 127, Q8_0's rule). full=False is
    the earlier "midpoint" grid, step 2 max|w| / (2**bits - 1), which never uses one code and
    clips the positive extreme by half a step (1.22x Q4_0's squared error at int4 g32).

    The scale's magnitude is always rounded up to float16. gguf_exact: an asymmetric 4-bit
    grid also makes scale x zero float16-exact (`fp16_exact_step`; the step only widens, with
    the zero point chosen for the unwidened step, so the grid still spans [lo, hi]); symmetric
    zero points are powers of two, whose products with an fp16 scale are exact already.
    """
    maxq = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = torch.maximum(lo.abs(), hi.abs())
        if not full:
            scale = 2 * amax / maxq
        elif bits == 8:
            scale = amax / (half - 1)
        else:
            scale = torch.where(hi >= -lo, hi, lo) / -half
        zero = torch.full_like(scale, float(half))
    else:
        lo = lo.clamp(max=0)
        hi = hi.clamp(min=0)
        scale = (hi - lo) / maxq
    # An all-zero group still needs a nonzero step (any code maps back to 0 with the zero point).
    sign = torch.where(scale < 0, -1.0, 1.0)
    scale = sign * fp16_ceil(torch.where(scale != 0, scale.abs(), torch.ones_like(scale)).clamp(min=2**-24))
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
        # Only a 4-bit grid: Q4_1 is the one llama.cpp block that stores scale x zero point, and
        # asymmetric int8 (no GGUF block at all) would give up to 8 of the step's 11 bits to
        # its zero points.
        if gguf_exact and bits == 4:
            scale = fp16_exact_step(scale, zero)
    return scale, zero


def searched_symmetric_grid(x: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                            steps: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """The full symmetric grid (`grid_params`) of groups x (..., group) with each step searched:
    the group's signed extreme is put on -(2**(bits-1) + k / 10) codes for k in -steps..steps
    and each candidate's codes are refitted with their least-squares step (llama.cpp's
    `make_qx_quants`), every step rounded to float16 and scored by the squared error it really
    gives, weighted by `importance` (broadcast to x: the columns' input energy where
    calibration exists; None: x^2, as llama.cpp weighs it without an importance matrix). The
    plain rule is a candidate, so the search never does worse on that score."""
    half = 2 ** (bits - 1)
    a = x * x if importance is None else importance.expand_as(x)
    scale, zero = grid_params(x.amin(-1), x.amax(-1), bits, True)

    def error(step):
        q = quantize_codes(x, step[..., None], zero[..., None], bits) - zero[..., None]
        return (a * (x - q * step[..., None]) ** 2).sum(-1)

    best, best_err = scale, error(scale)
    extreme = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    nonzero = extreme != 0
    for k in range(-steps, steps + 1):
        inverse = -(half + k / 10) / torch.where(nonzero, extreme, torch.ones_like(extreme))
        refit, _ = refit_symmetric(x, a, inverse[..., None], half)
        for step in (1 / inverse, refit):
            ok = nonzero & (step != 0) & torch.isfinite(step)
            step = torch.where(ok, step, scale).to(torch.float16).float()
            step = torch.where(step == 0, scale, step)
            err = error(step)
            better = ok & (err < best_err)
            best = torch.where(better, step, best)
            best_err = torch.where(better, err, best_err)
    return best, zero


def searched_asymmetric_grid(x: torch.Tensor, bits: int, importance: torch.Tensor | None = None, steps: int = 10,
                             gguf_exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric grid (`grid_params`) of groups x (..., group) with each step searched: the
    range [min(x, 0), max(x, 0)] spread over 2**bits - 1 + k / 10 codes for k in -steps..steps
    (narrower steps clip the ends, wider ones move the grid's points), the zero point the
    nearest code to 0, and each candidate's codes refitted with their least-squares step for
    that zero point (llama.cpp's `make_qkx2_quants` in spirit, with the integer zero point our
    format and Q4_1's fp16 minimum keep exact). Every step is rounded to float16 (with
    gguf_exact, to a float16 step whose product with the zero point float16 holds too) and
    scored by the squared error it really gives, weighted by `importance` (the columns' input
    energy; None: every weight alike -- on the default teacher's int4 g32 groups that gives a
    lower KL than x^2 weights, 0.94x the plain rule's against 0.97x). The plain rule is a
    candidate, so the search never does worse on that score."""
    maxq = 2**bits - 1
    a = torch.ones_like(x) if importance is None else importance.expand_as(x)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    span = hi - lo
    scale, zero = grid_params(lo, hi, bits, False, gguf_exact)

    def fit(step):
        """(step, zero point) of a candidate step: fp16, the zero point for it, gguf_exact."""
        step = fp16_ceil(step.abs().clamp(min=2**-24))
        z = torch.round(-lo / step).clamp(0, maxq)
        return (fp16_exact_step(step, z) if gguf_exact and bits == 4 else step), z

    def error(step, z):
        q = quantize_codes(x, step[..., None], z[..., None], bits) - z[..., None]
        return (a * (x - q * step[..., None]) ** 2).sum(-1)

    best_scale, best_zero = scale, zero
    best_err = error(scale, zero)
    varied = span > 0
    for k in range(-steps, steps + 1):
        step = torch.where(varied, span / (maxq + k / 10), scale)
        step, z = fit(step)
        q = quantize_codes(x, step[..., None], z[..., None], bits) - z[..., None]
        qq = (a * q * q).sum(-1)
        refit = torch.where(qq > 0, (a * x * q).sum(-1) / qq.clamp(min=1e-30), step)
        for candidate in (step, refit):
            c_step, c_zero = fit(torch.where(varied & (candidate > 0), candidate, scale))
            err = error(c_step, c_zero)
            better = varied & (err < best_err)
            best_scale = torch.where(better, c_step, best_scale)
            best_zero = torch.where(better, c_zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def searched_grid(x: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                  gguf_exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The full grid of groups x (..., group) with each group's step searched, weighted by
    `importance` (broadcast to x): `searched_symmetric_grid` or `searched_asymmetric_grid`."""
    if symmetric:
        return searched_symmetric_grid(x, bits, importance)
    return searched_asymmetric_grid(x, bits, importance, gguf_exact=gguf_exact)


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
    gguf_exact: bool = False, importance: torch.Tensor | None = None, full: bool = True, search: bool = True,
    grid: str = "",
) -> QuantizedWeight:
    """Quantize a float weight (out, in) group-wise; clip (scalar or (out, groups)) shrinks the
    range; gguf_exact and full as in `grid_params`. A full grid without clipping has its steps
    searched (`searched_grid`, weighted by `importance` (in,) when given) unless search=False.
    llama.cpp's K-quant grids (`quantize.kquant`) take their own groups: bits=6 rounds to Q6_K, bits=3 to Q3_K, grid="k" 4-bit codes to Q4_K, their searches weighted
    by `importance` (the columns' input energy) where calibration gives one. 5-bit codes (Q5_0)
    and 3- and 6-bit ones are stored at 8, 4 and 8 bits (`storage_bits`)."""
    if bits in SIGNED_K:
        return signed_k_quantize(w, SIGNED_K[bits], importance)
    if grid == "k":
        return q4_k_quantize(w, importance)
    w = w.detach().float()
    out_f, in_f = w.shape
    groups = in_f // group_size
    if full and search and not isinstance(clip, torch.Tensor) and clip == 1.0:
        imp = None if importance is None else importance.float().to(w.device).reshape(1, groups, group_size)
        scale, zero = searched_grid(w.reshape(out_f, groups, group_size), bits, symmetric, imp, gguf_exact)
    else:
        lo, hi = group_ranges(w, group_size, clip)
        scale, zero = grid_params(lo, hi, bits, symmetric, gguf_exact, full)  # (out, groups)
    codes = quantize_codes(
        w.reshape(out_f, groups, group_size), scale[..., None], zero[..., None], bits
    ).reshape(out_f, in_f)
    return QuantizedWeight(storage_bits(bits), group_size, codes.to(torch.uint8), scale, zero.to(torch.uint8))


@register_handler(RTNConfig)
@torch.no_grad()
def _rtn(model, config: RTNConfig, calibration, progress: bool) -> None:
    for name, lin in each_projection(model, "rtn", progress):
        replace_linear(model, name, rtn_quantize(lin.weight, config.bits_for(name),
                                                 config.group_for(lin.in_features, name), config.symmetric_for(name),
                                                 gguf_exact=config.gguf_exact, full=config.full,
                                                 grid=config.grid_for(name)))
    if config.include_embeddings:
        w = model.transformer.wte.weight
        quantize_embeddings(model, rtn_quantize(w, config.bits_for("lm_head"), config.group_for(w.shape[1], "lm_head"),
                                                config.symmetric_for("lm_head"), gguf_exact=config.gguf_exact,
                                                full=config.full))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(RTNConfig, GPTQ_LAYOUT)
