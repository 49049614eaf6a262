"""llama.cpp's K-quant grids (Q6_K, Q3_K and Q4_K), as integer weights every runtime here can run.

Q6_K and Q3_K cut a row into super-blocks of 256 weights, each into 16 sub-blocks of 16. A
weight is

    w = d * sc[j] * (q - zero),   sc[j] a signed integer per sub-block,  d an fp16 per super-block

Q6_K: q in 0..63 around 32, sc an int8; Q3_K: q in 0..7 around 4, sc in -32..31 (6 bits). So
a sub-block is an ordinary group of 16 columns whose scale is d * sc[j] (exact in float32: 11
significant bits times at most 8) with an integer zero point. Stored so (`QuantizedWeight`
with 8-bit storage for Q6_K's codes, 4-bit for Q3_K's, groups of 16), the PyTorch modules, the
GPTQ checkpoint and ONNX Runtime's MatMulNBits (blocks of 16) compute exactly the weights
llama.cpp's blocks compute, and the GGUF export recovers d and sc from the scales
(`signed_k_decompose`).

Pure functions. Each sub-block's scale is searched as llama.cpp's `make_qx_quants` does it
(the signed extreme on the lowest code with the step widened by up to 9 tenths of a code
either way, each candidate's codes refitted with the least-squares scale), scored by
importance weights: x^2 without calibration as llama.cpp does, the layer's input energy (the
Hessian's diagonal) where calibration data exists, so the search minimizes the output error.

Q4_K (further down) is asymmetric: a 6-bit step and a 6-bit minimum per 32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactgpt.errors import ConfigError

from .format import QuantizedWeight, quantize_codes

K_SUPER = 256  # weights per super-block (one fp16 d) in every K-quant


@dataclass(frozen=True)
class SignedKQuant:
    """One of llama.cpp's symmetric K-quants: w = d * sc * (q - zero) per sub-block of `group`."""

    name: str  # its GGUF type
    bits: int  # width of the codes q
    stored_bits: int  # width they are stored and run at (MatMulNBits holds 4 and 8)
    sc_limit: int  # sc in -sc_limit .. sc_limit - 1; the super-block's largest step lands on -sc_limit
    group: int = 16

    @property
    def zero(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def bits_per_weight(self) -> float:
        """As GGUF stores it: the codes, sc per sub-block, an fp16 d per super-block."""
        sc_bits = 8 if self.sc_limit == 128 else 6
        return self.bits + sc_bits / self.group + 16 / K_SUPER


Q6_K = SignedKQuant("Q6_K", bits=6, stored_bits=8, sc_limit=128)  # 210 bytes per 256 weights
Q3_K = SignedKQuant("Q3_K", bits=3, stored_bits=4, sc_limit=32)  # 110 bytes per 256 weights
SIGNED_K = {kind.bits: kind for kind in (Q6_K, Q3_K)}  # a layer's bits -> its grid


def check_k_width(in_features: int, name: str, kind: str, fix: str) -> None:
    """ConfigError when a matrix's rows are not whole K-quant super-blocks."""
    if in_features % K_SUPER:
        raise ConfigError(f"{name}: llama.cpp's {kind} uses super-blocks of {K_SUPER} columns, and its "
                          f"{in_features} columns are not a multiple of {K_SUPER}; {fix}")


def refit_symmetric(x: torch.Tensor, importance: torch.Tensor, inverse_step: torch.Tensor,
                    half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate of a symmetric step search (llama.cpp's `make_qx_quants`): the signed codes
    (-half..half-1) of x (..., group) at 1 / inverse_step (..., 1), the least-squares step for
    those codes (0 where every code is 0), and the weighted error reduction it reaches
    (sum(a x q)^2 / sum(a q^2))."""
    q = torch.clamp(torch.round(x * inverse_step), -half, half - 1)
    xq = (importance * x * q).sum(-1)
    qq = (importance * q * q).sum(-1)
    step = torch.where(qq > 0, xq / qq.clamp(min=1e-30), torch.zeros_like(xq))
    return step, torch.where(qq > 0, xq * xq / qq.clamp(min=1e-30), torch.zeros_like(xq))


def sub_block_steps(x: torch.Tensor, importance: torch.Tensor, half: int) -> torch.Tensor:
    """The searched step of every sub-block of x (..., group) under importance (same shape), for
    signed codes -half..half-1: the candidate with the lowest weighted squared error
    (`make_qx_quants`, 19 candidates)."""
    extreme = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))  # signed, (..., 1)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_step, best = refit_symmetric(x, importance, -half / safe, half)
    for tenth in range(-9, 10):
        if tenth == 0:
            continue
        step, score = refit_symmetric(x, importance, -(half + 0.1 * tenth) / safe, half)
        better = score > best
        best_step = torch.where(better, step, best_step)
        best = torch.where(better, score, best)
    return torch.where(extreme.squeeze(-1) == 0, torch.zeros_like(best_step), best_step)


def signed_k_grid(w: torch.Tensor, kind: SignedKQuant, importance: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `kind` grid (Q6_K or Q3_K) of w (out, in): float32 scales d * sc (out, in / 16), exact
    products of an fp16 d per super-block and an integer sc per sub-block, and the zero points.

    importance: (in,) weights of the columns' squared errors (input energy), or None for
    llama.cpp's own choice, w^2. The sub-block steps are searched, then each super-block's
    steps are quantized against the largest, which lands on -sc_limit (`quantize_row_q6_K_ref`,
    `quantize_row_q3_K_ref`).
    """
    w = w.detach().float()
    out_f, in_f = w.shape
    check_k_width(in_f, "weight", kind.name, "use another width")
    x = w.reshape(out_f, in_f // kind.group, kind.group)
    if importance is None:
        a = x * x
    else:
        a = importance.detach().float().to(w.device).reshape(1, -1, kind.group).expand_as(x)
    steps = sub_block_steps(x, a, kind.zero).reshape(out_f, in_f // K_SUPER, K_SUPER // kind.group)
    largest = torch.gather(steps, -1, steps.abs().argmax(-1, keepdim=True))  # (out, supers, 1)
    limit = float(kind.sc_limit)
    inverse = torch.where(largest == 0, torch.zeros_like(largest), -limit / torch.where(largest == 0, 1.0, largest))
    sc = torch.clamp(torch.round(inverse * steps), -limit, limit - 1)
    d = torch.where(inverse == 0, torch.zeros_like(inverse), 1.0 / torch.where(inverse == 0, 1.0, inverse))
    d = d.to(torch.float16).float()
    scales = (d * sc).reshape(out_f, in_f // kind.group)
    return scales, torch.full_like(scales, float(kind.zero))


def signed_k_quantize(w: torch.Tensor, kind: SignedKQuant, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """w (out, in) rounded to the nearest point of its `kind` grid (`signed_k_grid`)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    scales, zeros = signed_k_grid(w, kind, importance)
    codes = quantize_codes(w.reshape(out_f, -1, kind.group), scales[..., None], kind.zero, kind.bits)
    codes = codes.reshape(out_f, in_f)
    return QuantizedWeight(kind.stored_bits, kind.group, codes.to(torch.uint8), scales, zeros.to(torch.uint8))


def signed_k_kind(qw: QuantizedWeight) -> SignedKQuant | None:
    """The symmetric K-quant whose codes qw holds (its storage width, codes below 2 * zero around
    zero, groups of 16, whole super-blocks, contiguous groups), or None. Its scales may still
    not decompose (`signed_k_decompose`)."""
    if qw.group_size != 16 or qw.g_idx is not None or qw.offsets is not None or qw.in_features % K_SUPER:
        return None
    for kind in SIGNED_K.values():
        if (qw.bits == kind.stored_bits and bool((qw.zeros == kind.zero).all())
                and int(qw.codes.max()) < 2 * kind.zero):
            return kind
    return None


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


def signed_k_decompose(scales: torch.Tensor, kind: SignedKQuant) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`kind`'s d (fp16, per 256 weights) and sc (int8, per 16, in -sc_limit..sc_limit-1) of
    sub-block scales (out, in / 16) with d * sc == scales exactly, or None (`split_super_blocks`)."""
    split = split_super_blocks(scales, K_SUPER // kind.group, -kind.sc_limit, kind.sc_limit - 1)
    return None if split is None else (split[0], split[1].to(torch.int8))


# ---------------------------------------------------------------------------------------
# Q4_K: w = d * sc[j] * q - dmin * m[j], q in 0..15, sc and m 6-bit per 32, d and dmin fp16 per 256

Q4_K_GROUP = 32
Q4_K_BITS = 4


def check_q4_k_width(in_features: int, name: str) -> None:
    """ConfigError when a matrix's rows are not whole Q4_K super-blocks."""
    check_k_width(in_features, name, "Q4_K (the k grid)", "use --grid full")


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
    per_super = K_SUPER // Q4_K_GROUP
    x = w.reshape(out_f, in_f // Q4_K_GROUP, Q4_K_GROUP)
    if importance is None:
        a = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    else:
        sigma2 = 2 * w.reshape(out_f, -1, K_SUPER).pow(2).mean(-1)  # per super-block
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
            or qw.in_features % K_SUPER or bool((qw.zeros != 0).any())):
        return None
    per_super = K_SUPER // Q4_K_GROUP
    steps = split_super_blocks(qw.scales, per_super, 0, 63)
    mins = split_super_blocks(-qw.offsets, per_super, 0, 63)
    if steps is None or mins is None:
        return None
    return steps[0], steps[1].to(torch.uint8), mins[0], mins[1].to(torch.uint8)
