"""llama.cpp's 6-bit K-quant grid (Q6_K), as integer weights every runtime here can run.

Q6_K cuts a row into super-blocks of 256 weights, each into 16 sub-blocks of 16. A weight is

    w = d * sc[j] * (q - 32),    q in 0..63,  sc[j] an int8 per sub-block,  d an fp16 per super-block

so a sub-block is an ordinary group of 16 columns whose scale is d * sc[j] (exact in float32:
11 significant bits times 8) with a zero point of 32. Stored so (`QuantizedWeight` with
8-bit storage, codes below 64, groups of 16), the PyTorch modules, the GPTQ checkpoint and
ONNX Runtime's MatMulNBits (8-bit blocks of 16) compute exactly the weights llama.cpp's Q6_K
block computes, and the GGUF export recovers d and sc from the scales (`q6_k_decompose`).

Pure functions. Each sub-block's scale is searched as llama.cpp's `make_qx_quants` does it
(the signed extreme on code -32 with the step widened by up to 9 tenths of a code either
way, each candidate's codes refitted with the least-squares scale), scored by importance
weights: x^2 without calibration as llama.cpp does, the layer's input energy (the Hessian's
diagonal) where calibration data exists, so the search minimizes the output error.
"""

from __future__ import annotations

import torch

from compactgpt.errors import ConfigError

from .format import QuantizedWeight, quantize_codes

Q6_K_SUPER = 256  # weights per super-block (one fp16 d)
Q6_K_GROUP = 16  # weights per sub-block (one int8 scale)
Q6_K_ZERO = 32  # codes 0..63 around 32
Q6_K_BITS = 6


def check_q6_k_width(in_features: int, name: str) -> None:
    """ConfigError when a matrix's rows are not whole Q6_K super-blocks."""
    if in_features % Q6_K_SUPER:
        raise ConfigError(f"{name}: 6-bit weights use llama.cpp's Q6_K super-blocks of {Q6_K_SUPER} columns, and "
                          f"its {in_features} columns are not a multiple of {Q6_K_SUPER}; use 8 bits for it "
                          "(--head-bits 8)")


def refit_symmetric(x: torch.Tensor, importance: torch.Tensor, inverse_step: torch.Tensor,
                    half: int = Q6_K_ZERO) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate of a symmetric step search (llama.cpp's `make_qx_quants`): the signed codes
    (-half..half-1) of x (..., group) at 1 / inverse_step (..., 1), the least-squares step for
    those codes (0 where every code is 0), and the weighted error reduction it reaches
    (sum(a x q)^2 / sum(a q^2))."""
    q = torch.clamp(torch.round(x * inverse_step), -half, half - 1)
    xq = (importance * x * q).sum(-1)
    qq = (importance * q * q).sum(-1)
    step = torch.where(qq > 0, xq / qq.clamp(min=1e-30), torch.zeros_like(xq))
    return step, torch.where(qq > 0, xq * xq / qq.clamp(min=1e-30), torch.zeros_like(xq))


def sub_block_steps(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The searched step of every sub-block of x (..., 16) under importance (..., 16): the
    candidate with the lowest weighted squared error (`make_qx_quants`, 19 candidates)."""
    extreme = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))  # signed, (..., 1)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_step, best = refit_symmetric(x, importance, -Q6_K_ZERO / safe)
    for tenth in range(-9, 10):
        if tenth == 0:
            continue
        step, score = refit_symmetric(x, importance, -(Q6_K_ZERO + 0.1 * tenth) / safe)
        better = score > best
        best_step = torch.where(better, step, best_step)
        best = torch.where(better, score, best)
    return torch.where(extreme.squeeze(-1) == 0, torch.zeros_like(best_step), best_step)


def q6_k_grid(w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q6_K grid of w (out, in): float32 scales d * sc (out, in / 16), exact products of an
    fp16 d per super-block and an int8 sc per sub-block, and the zero points (all 32).

    importance: (in,) weights of the columns' squared errors (input energy), or None for
    llama.cpp's own choice, w^2. The sub-block steps are searched, then each super-block's
    steps are quantized to int8 against the largest, which lands on -128 (`quantize_row_q6_K_ref`).
    """
    w = w.detach().float()
    out_f, in_f = w.shape
    check_q6_k_width(in_f, "weight")
    x = w.reshape(out_f, in_f // Q6_K_GROUP, Q6_K_GROUP)
    if importance is None:
        a = x * x
    else:
        a = importance.detach().float().to(w.device).reshape(1, -1, Q6_K_GROUP).expand_as(x)
    steps = sub_block_steps(x, a).reshape(out_f, in_f // Q6_K_SUPER, Q6_K_SUPER // Q6_K_GROUP)
    largest = torch.gather(steps, -1, steps.abs().argmax(-1, keepdim=True))  # (out, supers, 1)
    inverse = torch.where(largest == 0, torch.zeros_like(largest), -128.0 / torch.where(largest == 0, 1.0, largest))
    sc = torch.clamp(torch.round(inverse * steps), -128, 127)
    d = torch.where(inverse == 0, torch.zeros_like(inverse), 1.0 / torch.where(inverse == 0, 1.0, inverse))
    d = d.to(torch.float16).float()
    scales = (d * sc).reshape(out_f, in_f // Q6_K_GROUP)
    return scales, torch.full_like(scales, float(Q6_K_ZERO))


def q6_k_quantize(w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """w (out, in) rounded to the nearest point of its Q6_K grid (`q6_k_grid`)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    scales, zeros = q6_k_grid(w, importance)
    codes = quantize_codes(w.reshape(out_f, -1, Q6_K_GROUP), scales[..., None], Q6_K_ZERO, Q6_K_BITS)
    codes = codes.reshape(out_f, in_f)
    return QuantizedWeight(8, Q6_K_GROUP, codes.to(torch.uint8), scales, zeros.to(torch.uint8))


def is_q6_k(qw: QuantizedWeight) -> bool:
    """Whether qw holds Q6_K-shaped codes: 8-bit storage of codes below 64 around 32, groups of 16,
    whole super-blocks, contiguous groups (its scales may still not decompose: `q6_k_decompose`)."""
    return (qw.bits == 8 and qw.group_size == Q6_K_GROUP and qw.g_idx is None and qw.in_features % Q6_K_SUPER == 0
            and bool((qw.zeros == Q6_K_ZERO).all()) and int(qw.codes.max()) < 2 * Q6_K_ZERO)


def split_super_blocks(values: torch.Tensor, per_super: int, low: int, high: int
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split per-group values (out, groups) into an fp16 factor per super-block of `per_super`
    groups (out, groups / per_super) and integer multiples in low..high (out, groups) whose
    products equal the values exactly in float32, or None when some super-block has no such
    split (values that were not made on the grid).

    The split need not be the quantizer's own: any split with the same products decodes to the
    same weights. The largest value of a super-block is the factor times some multiple in the
    range; each candidate multiple is tried, largest first.
    """
    out_f, n = values.shape
    v = values.float().reshape(out_f, n // per_super, per_super)
    largest = torch.gather(v, -1, v.abs().argmax(-1, keepdim=True))
    factor = torch.zeros_like(largest)
    found = largest == 0  # an all-zero super-block: factor 0, multiples 0
    multiples = sorted((m for m in range(low, high + 1) if m), key=lambda m: (-abs(m), m))
    for multiple in multiples:
        if bool(found.all()):
            break
        candidate = largest / multiple
        exact = candidate.to(torch.float16).float() == candidate
        k = torch.round(v / torch.where(candidate == 0, 1.0, candidate))
        fits = (~found & exact & ((k >= low) & (k <= high)).all(-1, keepdim=True)
                & ((candidate * k) == v).all(-1, keepdim=True))
        factor = torch.where(fits, candidate, factor)
        found |= fits
    if not bool(found.all()):
        return None
    k = torch.round(v / torch.where(factor == 0, 1.0, factor))
    return factor.squeeze(-1).to(torch.float16), k.reshape(out_f, n)


def q6_k_decompose(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q6_K's d (fp16, per 256 weights) and sc (int8, per 16) of sub-block scales (out, in / 16)
    with d * sc == scales exactly, or None (`split_super_blocks`)."""
    split = split_super_blocks(scales, Q6_K_SUPER // Q6_K_GROUP, -128, 127)
    return None if split is None else (split[0], split[1].to(torch.int8))


# ---------------------------------------------------------------------------------------
# Q4_K: w = d * sc[j] * q - dmin * m[j], q in 0..15, sc and m 6-bit per 32, d and dmin fp16 per 256

Q4_K_SUPER = 256
Q4_K_GROUP = 32
Q4_K_BITS = 4


def check_q4_k_width(in_features: int, name: str) -> None:
    """ConfigError when a matrix's rows are not whole Q4_K super-blocks."""
    if in_features % Q4_K_SUPER:
        raise ConfigError(f"{name}: the k grid (llama.cpp's Q4_K) uses super-blocks of {Q4_K_SUPER} columns, and "
                          f"its {in_features} columns are not a multiple of {Q4_K_SUPER}; use --grid full")


def _fit_scale_and_min(x: torch.Tensor, a: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares step and minimum (<= 0) of x ~ step * q + minimum under weights a."""
    sw, sl, sl2 = a.sum(-1), (a * q).sum(-1), (a * q * q).sum(-1)
    sx, sxl = (a * x).sum(-1), (a * x * q).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    step = (sw * sxl - sx * sl) / det
    minimum = (sl2 * sx - sl * sxl) / det
    through_zero = minimum > 0  # the grid must reach 0: refit the step alone with the minimum at 0
    step = torch.where(through_zero, sxl / sl2.clamp(min=1e-30), step)
    minimum = torch.where(through_zero, torch.zeros_like(minimum), minimum)
    return torch.where(ok, step, torch.zeros_like(step)), torch.where(ok, minimum, torch.zeros_like(minimum))


def sub_block_steps_and_mins(x: torch.Tensor, a: torch.Tensor, nmax: int = 15, steps: int = 20
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step and minimum (<= 0) of every sub-block of x (..., 32) minimizing the weighted
    squared error (llama.cpp's `make_qkx2_quants`: the range [min(x, 0), max(x)] spread over
    nmax - 1 + k/10 codes for k = 0..steps, each candidate's codes refitted by least squares)."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)

    def error(step, minimum):
        safe = torch.where(step == 0, torch.ones_like(step), step)
        q = torch.clamp(torch.round((x - minimum[..., None]) / safe[..., None]), 0, nmax)
        return (a * (step[..., None] * q + minimum[..., None] - x) ** 2).sum(-1)

    best_step, best_min = span / nmax, lo
    best_err = error(best_step, best_min)
    for k in range(steps + 1):
        inverse = (nmax - 1 + 0.1 * k) / span
        q = torch.clamp(torch.round(inverse[..., None] * (x - lo[..., None])), 0, nmax)
        step, minimum = _fit_scale_and_min(x, a, q)
        err = error(step, minimum)
        better = (step > 0) & (err < best_err)
        best_step = torch.where(better, step, best_step)
        best_min = torch.where(better, minimum, best_min)
        best_err = torch.where(better, err, best_err)
    # A constant sub-block at or below zero: no step, its value as the minimum.
    return torch.where(flat, torch.zeros_like(best_step), best_step), torch.where(flat, lo, best_min)


def q4_k_grid(w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q4_K grid of w (out, in): float32 steps d * sc (out, in / 32) and offsets -dmin * m
    (out, in / 32), exact products of an fp16 d and dmin per super-block and 6-bit sc and m per
    sub-block (`quantize_row_q4_K`). Sub-block errors are weighted as llama.cpp weighs them:
    mean|x| + |x| without an importance, importance * sqrt(sigma^2 + x^2) with one (the input
    energy of each column, (in,)). Every step is at least one unit of d, so ONNX Runtime's
    MatMulNBits, which takes the offset as a float zero point offset / step, can hold it."""
    w = w.detach().float()
    out_f, in_f = w.shape
    check_q4_k_width(in_f, "weight")
    per_super = Q4_K_SUPER // Q4_K_GROUP
    x = w.reshape(out_f, in_f // Q4_K_GROUP, Q4_K_GROUP)
    if importance is None:
        a = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    else:
        sigma2 = 2 * w.reshape(out_f, -1, Q4_K_SUPER).pow(2).mean(-1)  # per super-block
        sigma2 = sigma2.repeat_interleave(per_super, dim=1)[..., None]
        a = importance.detach().float().to(w.device).reshape(1, -1, Q4_K_GROUP) * (sigma2 + x * x).sqrt()
    steps, mins = sub_block_steps_and_mins(x, a)
    steps = steps.reshape(out_f, -1, per_super)
    mins = (-mins).reshape(out_f, -1, per_super)  # stored positive, subtracted
    max_step = steps.amax(-1, keepdim=True)
    max_min = mins.amax(-1, keepdim=True)
    d = (max_step / 63).to(torch.float16).float()
    d = torch.where(d > 0, d, torch.full_like(d, 2.0**-24))
    dmin = (max_min / 63).to(torch.float16).float()
    sc = torch.clamp(torch.round(steps / d), 1, 63)
    m = torch.where(dmin > 0, torch.clamp(torch.round(mins / torch.where(dmin > 0, dmin, 1.0)), 0, 63),
                    torch.zeros_like(mins))
    return (d * sc).reshape(out_f, -1), (-(dmin * m)).reshape(out_f, -1)


def q4_k_quantize(w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """w (out, in) rounded to the nearest point of its Q4_K grid (`q4_k_grid`)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    scales, offsets = q4_k_grid(w, importance)
    codes = quantize_codes(w.reshape(out_f, -1, Q4_K_GROUP) - offsets[..., None], scales[..., None], 0, Q4_K_BITS)
    codes = codes.reshape(out_f, in_f)
    return QuantizedWeight(4, Q4_K_GROUP, codes.to(torch.uint8), scales, torch.zeros_like(scales, dtype=torch.uint8),
                           offsets=offsets)


def q4_k_decompose(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(d, sc, dmin, m) of a weight on the Q4_K grid -- fp16 d and dmin (out, in / 256), sc and m
    in 0..63 (out, in / 32) with d * sc == steps and -dmin * m == offsets exactly -- or None."""
    if (qw.bits != 4 or qw.group_size != Q4_K_GROUP or qw.offsets is None or qw.g_idx is not None
            or qw.in_features % Q4_K_SUPER or bool((qw.zeros != 0).any())):
        return None
    per_super = Q4_K_SUPER // Q4_K_GROUP
    steps = split_super_blocks(qw.scales, per_super, 0, 63)
    mins = split_super_blocks(-qw.offsets, per_super, 0, 63)
    if steps is None or mins is None:
        return None
    return steps[0], steps[1].to(torch.uint8), mins[0], mins[1].to(torch.uint8)
