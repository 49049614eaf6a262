"""AWQ (activation-aware weight quantization): pure search functions.

Weights that meet large activations matter most. Scaling input channel j of a weight by
s_j (and its input by 1/s_j, folded into the previous LayerNorm or projection) keeps the float
function but gives those channels a finer grid. `search_scales_through` tries s = mean|x|^a / mean|w|^(1-a)
for a on a grid, plus the identity (so the search never does worse than round-to-nearest on
the calibration data), and keeps the one whose quantized *module* output (the attention or
the MLP the layer feeds, not just the layer) is closest to the float output.
`search_clip` then shrinks each group's range where clipping a few large weights lowers the
output error of that group.

`_awq` at the end, registered for AWQConfig, applies both searches to a GPT over the
calibration walk; which layers get scales and where they are folded is `AWQ_MAPPINGS`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from compactgpt.model import CausalSelfAttention

from .calibrate import BlockHooks, walk_blocks
from .config import AWQConfig
from .format import QuantizedWeight
from .gptq_layout import GPTQ_LAYOUT
from .handlers import (BLOCK_LAYERS, layer_name, quantize_embeddings, register_handler, register_layout,
                       replace_linear)
from .rtn import fake_quantize, grid_params, group_ranges, rtn_quantize
from .smoothquant import ScaleMapping, fold_mapping

# Calibration windows AWQ's scale search runs through each module, and input rows (a fixed,
# spread-out subset) its clipping search scores.
AWQ_SEARCH_WINDOWS = 32
AWQ_CLIP_ROWS = 1024

# Each scale is judged by the output of the module its layer feeds: the attention for q/k/v
# (errors in q and k pass through the softmax), the MLP for its first layer. mlp.c_proj reads
# the GELU's output: no linear op to fold a scale into, so it gets the clipping search alone.
AWQ_MAPPINGS = (
    ScaleMapping("ln_1", ("attn.c_attn",), judge="attn"),
    ScaleMapping("attn.c_attn", ("attn.c_proj",), judge="attn.c_proj"),
    ScaleMapping("ln_2", ("mlp.c_fc",), judge="mlp"),
)


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                         clip: torch.Tensor | float = 1.0, gguf_exact: bool = False, full: bool = True) -> torch.Tensor:
    """w (out, in) rounded group-wise to its grid (the one `rtn_quantize` stores for the same
    arguments) and mapped back to float."""
    out_f, in_f = w.shape
    lo, hi = group_ranges(w, group_size, clip)
    scale, zero = grid_params(lo, hi, bits, symmetric, gguf_exact, full)
    g = w.reshape(out_f, in_f // group_size, group_size)
    return fake_quantize(g, scale[..., None], zero[..., None], bits).reshape(out_f, in_f)


def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, symmetric: bool, n_grid: int,
    gguf_exact: bool = False, full: bool = True,
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
        Wq = fake_quantize_groups(W * s, bits, group_size, symmetric, gguf_exact=gguf_exact, full=full) / s
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
    n_grid: int, duo: bool = True, gguf_exact: bool = False, full: bool = True,
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
                p.copy_(fake_quantize_groups(w * s, bits, group_size, symmetric, gguf_exact=gguf_exact, full=full) / s)
            err = (forward(x) - ref).pow(2).mean().item()
            if err < best[0]:
                best = (err, s, a)
    finally:
        for p, w in zip(params, originals):
            p.copy_(w)
    return best[1], best[2]


def search_clip(
    x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int,
    max_shrink: float, fixed_rows: int = 0, gguf_exact: bool = False, full: bool = True,
) -> QuantizedWeight:
    """Quantize w (out, in) with a clipping ratio per (row, group) chosen to minimize the
    group's output error on inputs x (N, in). The first `fixed_rows` rows keep the full range
    (attention queries and keys, whose errors softmax amplifies). gguf_exact as in
    `quantize.rtn.grid_params`: each ratio is scored on the grid that would be stored."""
    x = x.float()
    w = w.float()
    out_f, in_f = w.shape
    groups = in_f // group_size
    if max_shrink <= 0:
        return rtn_quantize(w, bits, group_size, symmetric, gguf_exact=gguf_exact, full=full)
    xg = x.reshape(-1, groups, group_size)  # (N, G, gs)
    best_err = torch.full((out_f, groups), float("inf"), device=w.device)
    best_ratio = torch.ones(out_f, groups, device=w.device)
    wg = w.reshape(out_f, groups, group_size)
    for k in range(n_grid):
        ratio = 1.0 - max_shrink * k / n_grid
        d = (w - fake_quantize_groups(w, bits, group_size, symmetric, ratio, gguf_exact, full)).reshape(
            out_f, groups, group_size)
        # Output error of each group's contribution, averaged over the inputs: (out, G).
        err = torch.einsum("ngk,ogk->ogn", xg, d).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    del wg
    best_ratio[:fixed_rows] = 1.0
    return rtn_quantize(w, bits, group_size, symmetric, clip=best_ratio, gguf_exact=gguf_exact, full=full)


# ---------------------------------------------------------------------------------------
# The handler


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed, evenly spread subset of at most n rows of x (..., C) flattened to (N, C)."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).long()]


def _judge(block: nn.Module, name: str):
    """The forward of the module named `name` in the block, on its input alone."""
    module = block.get_submodule(name)
    if isinstance(module, CausalSelfAttention):
        return lambda x: module(x, None, None)[0]  # no cache, causal mask
    return module


class _AWQBlocks(BlockHooks):
    """Per block: every projection's inputs in one float pass; scales searched and folded
    mapping by mapping; then each projection's clipping search. Folding keeps the float
    function, so the float outputs feed the next block."""

    def __init__(self, model, config: AWQConfig):
        self.model, self.config = model, config
        self.inputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in BLOCK_LAYERS}
        self.search = dict(bits=config.bits, symmetric=config.symmetric, n_grid=config.n_grid,
                           gguf_exact=config.gguf_exact, full=config.full)

    def observe(self, layer: str, x: torch.Tensor) -> None:
        self.inputs[layer].append(x)

    def quantize(self, index: int, block: nn.Module, layers: tuple[str, ...]) -> None:
        X = {layer: torch.cat(v)[:AWQ_SEARCH_WINDOWS] for layer, v in self.inputs.items()}  # (n, T, in)
        self.inputs = {layer: [] for layer in BLOCK_LAYERS}
        gs = {layer: self.config.group_for(block.get_submodule(layer).in_features, layer_name(index, layer))
              for layer in BLOCK_LAYERS}
        for mapping in AWQ_MAPPINGS:
            (layer,) = mapping.layers
            s, _ = search_scales_through(X[layer], _judge(block, mapping.judge), [block.get_submodule(layer).weight],
                                         group_size=gs[layer], duo=self.config.duo_scaling, **self.search)
            fold_mapping(block, mapping, s)
            X[layer] = X[layer] / s
        for layer in BLOCK_LAYERS:
            lin = block.get_submodule(layer)
            fixed = 2 * lin.in_features if layer == "attn.c_attn" else 0  # queries and keys
            qw = search_clip(_rows(X[layer], AWQ_CLIP_ROWS), lin.weight, group_size=gs[layer],
                             max_shrink=self.config.max_shrink, fixed_rows=fixed, **self.search)
            replace_linear(self.model, layer_name(index, layer), qw)


@register_handler(AWQConfig)
@torch.no_grad()
def _awq(model, config: AWQConfig, calibration, progress: bool) -> None:
    hooks = _AWQBlocks(model, config)
    xs = walk_blocks(model, calibration, hooks, progress, "awq")
    if config.include_embeddings:
        h = _rows(model.transformer.ln_f(xs), AWQ_CLIP_ROWS)
        w = model.transformer.wte.weight
        bits = config.bits_for("lm_head")
        if bits in config.extra_bits:
            # llama.cpp's Q5_0 / Q6_K grids search their own scales, weighted by the head's input energy.
            quantize_embeddings(model, rtn_quantize(w, bits, config.group_for(w.shape[1], "lm_head"),
                                                    config.symmetric_for("lm_head"), importance=h.float().pow(2).mean(0)))
        else:
            quantize_embeddings(model, search_clip(h, w, group_size=config.group_for(w.shape[1], "lm_head"),
                                                   max_shrink=config.max_shrink,
                                                   **{**hooks.search, "bits": config.bits_for("lm_head")}))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(AWQConfig, GPTQ_LAYOUT)
