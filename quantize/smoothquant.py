"""SmoothQuant: migrate activation outliers into the weights, exactly, before int8 rounding.

For a LayerNorm followed by linear layers, dividing the LayerNorm's gain and bias by s and
multiplying the layers' input columns by s leaves the float function unchanged. Choosing
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) flattens the per-channel activation range that
per-token int8 activations cannot represent, at the cost of a (tolerable) wider weight range.

Which layers' inputs are scaled and where each scale is folded is data (`ScaleMapping`),
shared with AWQ. `_smoothquant` at the end, registered for SmoothQuantConfig, applies it to a
GPT over the calibration walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .calibrate import BlockHooks, walk_blocks
from .config import SmoothQuantConfig
from .gptq_layout import GPTQ_LAYOUT
from .handlers import (BLOCK_LAYERS, layer_name, quantize_embeddings, register_handler, register_layout,
                       replace_linear)
from .rtn import rtn_quantize


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


@dataclass(frozen=True)
class ScaleMapping:
    """Per-input-channel scales for `layers` (which share one input), folded exactly into
    `previous`: a LayerNorm, or the fused q/k/v projection whose value rows feed the attention
    output projection. `judge` names the module whose output AWQ compares when it searches the
    scales (errors in queries and keys pass through the softmax, so q/k/v are judged by the
    whole attention). Names are inside a block, as in llm-compressor's AWQ mappings."""

    previous: str
    layers: tuple[str, ...]
    judge: str = ""


# SmoothQuant scales the inputs that only a LayerNorm precedes.
SMOOTHQUANT_MAPPINGS = (
    ScaleMapping("ln_1", ("attn.c_attn",)),
    ScaleMapping("ln_2", ("mlp.c_fc",)),
)


@torch.no_grad()
def fold_mapping(block: nn.Module, mapping: ScaleMapping, s: torch.Tensor) -> None:
    """Fold scales s into the mapping's `previous` module and its layers' input columns."""
    previous = block.get_submodule(mapping.previous)
    linears = [block.get_submodule(layer) for layer in mapping.layers]
    if isinstance(previous, nn.LayerNorm):
        fold_scales(previous, linears, s)
    else:
        (c_proj,) = linears
        fold_scales_into_values(previous, c_proj, s)


class _SmoothBlocks(BlockHooks):
    """Per block: activation maxima of the smoothed layers' inputs in one float pass, scales
    folded, then int8 per-channel weights with int8 per-token activations. Smoothing keeps the
    float function, so the float outputs feed the next block."""

    steps = (tuple(layer for m in SMOOTHQUANT_MAPPINGS for layer in m.layers),)

    def __init__(self, model, config: SmoothQuantConfig):
        self.model, self.config = model, config
        self.amax: dict[str, torch.Tensor] = {}

    def observe(self, layer: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        self.amax[layer] = m if layer not in self.amax else torch.maximum(self.amax[layer], m)

    def quantize(self, index: int, block: nn.Module, layers: tuple[str, ...]) -> None:
        for mapping in SMOOTHQUANT_MAPPINGS:
            weights = [block.get_submodule(layer).weight for layer in mapping.layers]
            fold_mapping(block, mapping, smoothing_scales(self.amax[mapping.layers[0]], weights, self.config.alpha))
        self.amax = {}
        for layer in BLOCK_LAYERS:
            name = layer_name(index, layer)
            lin = block.get_submodule(layer)
            qw = rtn_quantize(lin.weight, 8, self.config.group_for(lin.in_features, name), self.config.symmetric,
                              gguf_exact=self.config.gguf_exact, full=self.config.full)
            replace_linear(self.model, name, qw, act_bits=8)


@register_handler(SmoothQuantConfig)
@torch.no_grad()
def _smoothquant(model, config: SmoothQuantConfig, calibration, progress: bool) -> None:
    walk_blocks(model, calibration, _SmoothBlocks(model, config), progress, "smoothquant")
    if config.include_embeddings:
        w = model.transformer.wte.weight
        quantize_embeddings(model, rtn_quantize(w, 8, config.group_for(w.shape[1], "lm_head"), config.symmetric,
                                                gguf_exact=config.gguf_exact, full=config.full))


# Saved as GPTQ checkpoint tensors (quantize.gptq_layout).
register_layout(SmoothQuantConfig, GPTQ_LAYOUT)
