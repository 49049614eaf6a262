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

from .format import QuantizedWeight

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


def _refit(x: torch.Tensor, importance: torch.Tensor, inverse_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (signed, -32..31) of x (..., 16) at 1 / inverse_step (..., 1), the least-squares
    step for those codes, and the weighted error reduction it reaches (sum(a x q)^2 / sum(a q^2))."""
    q = torch.clamp(torch.round(x * inverse_step), -Q6_K_ZERO, Q6_K_ZERO - 1)
    xq = (importance * x * q).sum(-1)
    qq = (importance * q * q).sum(-1)
    step = torch.where(qq > 0, xq / qq.clamp(min=1e-30), torch.zeros_like(xq))
    return step, torch.where(qq > 0, xq * xq / qq.clamp(min=1e-30), torch.zeros_like(xq))


def sub_block_steps(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The searched step of every sub-block of x (..., 16) under importance (..., 16): the
    candidate with the lowest weighted squared error (`make_qx_quants`, 19 candidates)."""
    extreme = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))  # signed, (..., 1)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_step, best = _refit(x, importance, -Q6_K_ZERO / safe)
    for tenth in range(-9, 10):
        if tenth == 0:
            continue
        step, score = _refit(x, importance, -(Q6_K_ZERO + 0.1 * tenth) / safe)
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


def q6_k_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes 0..63 (float) of w (..., n) on steps `scales` broadcast to it; a zero step (a
    sub-block of zeros) gives the zero point."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(w / safe) + Q6_K_ZERO, 0, 2 * Q6_K_ZERO - 1)
    return torch.where(scales == 0, torch.full_like(q, float(Q6_K_ZERO)), q)


def q6_k_quantize(w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """w (out, in) rounded to the nearest point of its Q6_K grid (`q6_k_grid`)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    scales, zeros = q6_k_grid(w, importance)
    codes = q6_k_codes(w.reshape(out_f, -1, Q6_K_GROUP), scales[..., None]).reshape(out_f, in_f)
    return QuantizedWeight(8, Q6_K_GROUP, codes.to(torch.uint8), scales, zeros.to(torch.uint8))


def is_q6_k(qw: QuantizedWeight) -> bool:
    """Whether qw holds Q6_K-shaped codes: 8-bit storage of codes below 64 around 32, groups of 16,
    whole super-blocks, contiguous groups (its scales may still not decompose: `q6_k_decompose`)."""
    return (qw.bits == 8 and qw.group_size == Q6_K_GROUP and qw.g_idx is None and qw.in_features % Q6_K_SUPER == 0
            and bool((qw.zeros == Q6_K_ZERO).all()) and int(qw.codes.max()) < 2 * Q6_K_ZERO)


def q6_k_decompose(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split sub-block scales (out, in / 16) into an fp16 d per super-block (out, in / 256) and
    int8 multiples sc (out, in / 16) with d * sc == scales exactly in float32, or None when some
    super-block has no such split (scales that were not made on the Q6_K grid).

    The split need not be the quantizer's own: any (d, sc) with the same products decodes to
    the same weights. The largest scale of a super-block is d times some multiple in
    -128..127; each candidate multiple is tried, the quantizer's own (-128) first.
    """
    out_f, n = scales.shape
    s = scales.float().reshape(out_f, n // (Q6_K_SUPER // Q6_K_GROUP), Q6_K_SUPER // Q6_K_GROUP)
    largest = torch.gather(s, -1, s.abs().argmax(-1, keepdim=True))
    d = torch.zeros_like(largest)
    found = largest == 0  # an all-zero super-block: d = 0, sc = 0
    for multiple in [-128, *range(127, 0, -1), *range(-1, -128, -1)]:
        if bool(found.all()):
            break
        candidate = largest / multiple
        exact = candidate.to(torch.float16).float() == candidate
        sc = torch.round(s / torch.where(candidate == 0, 1.0, candidate))
        fits = (~found & exact & ((sc >= -128) & (sc <= 127)).all(-1, keepdim=True)
                & ((candidate * sc) == s).all(-1, keepdim=True))
        d = torch.where(fits, candidate, d)
        found |= fits
    if not bool(found.all()):
        return None
    sc = torch.round(s / torch.where(d == 0, 1.0, d))
    return d.squeeze(-1).to(torch.float16), sc.reshape(out_f, n).to(torch.int8)
