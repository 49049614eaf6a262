"""GPTQ: optimal-brain-quantization of one linear layer at a time.

Pure math here: `accumulate_hessian` builds H = sum x x^T from a layer's calibration inputs and
`gptq_quantize` solves the layer: columns are quantized one by one and each column's rounding
error, scaled by the inverse Hessian (through its upper Cholesky factor), is pushed onto the
columns not yet quantized. Columns are processed in lazy batches of `block_columns`.

With activation order, columns with the largest Hessian diagonal (the most input energy) are
quantized first, while they still have the most columns left to absorb their error. The
groups' scales are then fixed up front from the original weights ("static groups"), so
groups stay contiguous in column order (no g_idx permutation): the layout every runtime,
the ONNX exporter included, reads directly.

The handler at the end applies it to a GPT: block by block over the calibration walk
(`quantize.calibrate.walk_blocks`), one layer at a time.
"""

from __future__ import annotations

import torch

from .calibrate import BlockHooks, walk_blocks
from .config import GPTQConfig
from .format import QuantizedWeight, storage_bits
from .gptq_layout import GPTQ_LAYOUT
from .handlers import (BLOCK_LAYERS, layer_name, quantize_embeddings, register_handler, register_layout,
                       replace_linear)
from .kquant import Q4_K_GROUP, SIGNED_K, q4_k_grid, signed_k_grid
from .rtn import grid_params, group_ranges, quantize_codes, searched_grid


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add x^T x of a batch of inputs (..., in) to H (in, in), float64; H None starts a new one."""
    x = x.reshape(-1, x.shape[-1]).double()
    update = x.T @ x
    return update if H is None else H + update


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    damp_percent: float = 0.01,
    act_order: bool = True,
    block_columns: int = 128,
    gguf_exact: bool = False,
    full: bool = True,
    grid: str = "",
) -> QuantizedWeight:
    """Quantize w (out, in) against the Hessian H (in, in) of its inputs; gguf_exact as in
    `quantize.rtn.grid_params`, applied where each group's grid is fixed, so the columns are
    solved against the grid that is stored.

    bits=6 and bits=3 solve on llama.cpp's Q6_K and Q3_K grids (`quantize.kquant`), fixed up
    front from the original weights with the input energy (H's diagonal) as the importance of
    each column's error; group_size is then their 16. grid="k" solves 4-bit codes on llama.cpp's
    Q4_K grid, fixed up front the same way (group_size 32, a float offset per group).

    Returns a QuantizedWeight with contiguous groups of `group_size` columns.
    """
    W = w.detach().clone().double()
    out_f, n = W.shape
    H = H.detach().clone().double().to(W.device)  # a Hessian gathered elsewhere joins the weight
    dead = torch.diag(H) == 0  # inputs that are always zero: any weight works, use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    maxq = 2**bits - 1
    device = W.device  # the solve runs where the weight is (a GPU when the model is there)

    k_grid = bits in SIGNED_K or grid == "k"
    if k_grid:
        group_size = SIGNED_K[bits].group if bits in SIGNED_K else Q4_K_GROUP
    groups = n // group_size
    static = act_order or group_size == n or k_grid
    scale = torch.zeros(out_f, groups, dtype=torch.float64, device=device)
    zero = torch.zeros(out_f, groups, dtype=torch.float64, device=device)
    offset = None  # Q4_K's per-group offsets
    if static:
        if bits in SIGNED_K:
            s, z = signed_k_grid(W.float(), SIGNED_K[bits], torch.diag(H).float())
        elif k_grid:
            s, o = q4_k_grid(W.float(), torch.diag(H).float())
            z, offset = torch.zeros_like(s), o.double()
        elif full:
            # Each group's step searched on the rounding error weighted by its columns' input energy.
            s, z = searched_grid(W.float().reshape(out_f, groups, group_size), bits, symmetric,
                                 torch.diag(H).float().reshape(1, groups, group_size), gguf_exact)
        else:
            s, z = grid_params(*group_ranges(W.float(), group_size), bits, symmetric, gguf_exact, full)
        scale, zero = s.double(), z.double()

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=device)
    W = W[:, perm]
    H = H[perm][:, perm]
    group_of = perm // group_size  # group of each column in processing order

    damp = damp_percent * torch.mean(torch.diag(H))
    H += damp * torch.eye(n, dtype=H.dtype, device=device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros(out_f, n, dtype=torch.float64, device=device)
    for i1 in range(0, n, block_columns):
        i2 = min(i1 + block_columns, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % group_size == 0:
                # Without activation order, a group's grid comes from its weights as already
                # updated by the earlier columns' errors (the original GPTQ rule).
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size].float()
                if full:
                    energy = torch.diag(H)[col:col + group_size].float().expand_as(ahead)
                    s, z = searched_grid(ahead, bits, symmetric, energy, gguf_exact)
                else:
                    s, z = grid_params(ahead.amin(1), ahead.amax(1), bits, symmetric, gguf_exact, full)
                scale[:, col // group_size], zero[:, col // group_size] = s.double(), z.double()
            g = group_of[col]
            wcol = W1[:, i]
            if offset is None:
                q = quantize_codes(wcol, scale[:, g], zero[:, g], bits)
                deq = (q - zero[:, g]) * scale[:, g]
            else:
                q = quantize_codes(wcol - offset[:, g], scale[:, g], zero[:, g], bits)
                deq = (q - zero[:, g]) * scale[:, g] + offset[:, g]
            codes[:, col] = q
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv].clamp(0, maxq)
    return QuantizedWeight(storage_bits(bits), group_size, codes.to(torch.uint8), scale.float(), zero.to(torch.uint8),
                           offsets=None if offset is None else offset.float())


# ---------------------------------------------------------------------------------------
# The handler: block by block, one layer at a time


class _GPTQBlocks(BlockHooks):
    """True-sequential GPTQ: each layer is solved on the inputs produced by the block's layers
    already quantized before it, so it compensates their errors too; the next block reads the
    quantized block's output."""

    steps = tuple((layer,) for layer in BLOCK_LAYERS)
    propagate_quantized = True

    def __init__(self, model, config: GPTQConfig):
        self.model, self.config = model, config
        self.hessian: torch.Tensor | None = None
        self.done: dict[str, QuantizedWeight] = {}

    def observe(self, layer: str, x: torch.Tensor) -> None:
        self.hessian = accumulate_hessian(self.hessian, x)

    def quantize(self, index: int, block, layers: tuple[str, ...]) -> None:
        (layer,) = layers
        lin = block.get_submodule(layer)
        name = layer_name(index, layer)
        qw = _solve(lin.weight, self.hessian, self.config, name)
        self.hessian = None
        # The float layer computes with the quantized weights until the block is done, so
        # the later layers and the next block see the quantized function.
        lin.weight.copy_(qw.dequantize())
        self.done[name] = qw

    def finish(self, index: int, block) -> None:
        for name, qw in self.done.items():
            replace_linear(self.model, name, qw)
        self.done = {}


def _solve(w: torch.Tensor, H: torch.Tensor, config: GPTQConfig, name: str) -> QuantizedWeight:
    """One layer (`name`: a block projection or lm_head) solved at its bits, groups and grid (the
    k grid is Q4_K for the blocks; 3, 5 and 6 bits are Q3_K, Q5_0 and Q6_K)."""
    return gptq_quantize(w, H, config.bits_for(name), config.group_for(w.shape[1], name), config.symmetric_for(name),
                         config.damp_percent, config.act_order, config.block_columns, config.gguf_exact, config.full,
                         config.grid_for(name))


@register_handler(GPTQConfig)
@torch.no_grad()
def _gptq(model, config: GPTQConfig, calibration, progress: bool) -> None:
    xs = walk_blocks(model, calibration, _GPTQBlocks(model, config), progress, "gptq")
    if config.include_embeddings:
        w = model.transformer.wte.weight
        H = accumulate_hessian(None, model.transformer.ln_f(xs))
        quantize_embeddings(model, _solve(w, H, config, "lm_head"))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(GPTQConfig, GPTQ_LAYOUT)
