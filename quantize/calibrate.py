"""Calibration windows as the methods take them, and the one block-by-block walk that every
calibrated method shares.

    walk_blocks(model, calibration, hooks)

embeds the calibration windows, then for each transformer block: runs the block over the
current activations with forward pre-hooks that hand the inputs of the layers a method
observes to `hooks.observe`, lets the method quantize what it observed (`hooks.quantize`),
and passes the block's output on to the next block. GPTQ, AWQ and SmoothQuant only say what
they do per block (a `BlockHooks`); the walk, the batching and the hand-over between blocks
are written here once. Memory stays about one block plus its calibration activations.

The windows themselves are drawn by `compactgpt.calibration.calibration_windows`, as prune
and sparsify draw theirs (`quantize.stage.resolve_calibration` finds the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from compactgpt.device import device_of
from compactgpt.model import GPT

from .handlers import BLOCK_LAYERS, each_block

# ---------------------------------------------------------------------------------------
# Calibration data


@dataclass
class CalibrationData:
    """Token windows (n, T) that calibrated methods run through the model, and where they were
    drawn from (recorded in the artifact's manifest)."""

    ids: torch.Tensor
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "samples": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1])}


# ---------------------------------------------------------------------------------------
# The block walk


@torch.no_grad()
def embed(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The input of the first block, (n, T, C), on the model's device: calibration windows are
    drawn on the CPU and moved here, where data meets the model."""
    device = device_of(model)
    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device)[None]
    return model.transformer.wte(ids) + model.transformer.wpe(pos)


@torch.no_grad()
def run_block(block: nn.Module, xs: torch.Tensor, batch: int = 16,
              hooks: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
    """Run a block on every calibration window; `hooks` see each listed module's input."""
    handles = [m.register_forward_pre_hook(lambda mod, args, f=f: f(args[0])) for m, f in (hooks or {}).items()]
    try:
        return torch.cat([block(xs[i : i + batch])[0] for i in range(0, xs.shape[0], batch)])
    finally:
        for h in handles:
            h.remove()


class BlockHooks:
    """What a calibrated method does in each block; `walk_blocks` does the rest.

    `steps` lists groups of the block's layers (names inside the block, e.g. "attn.c_attn"):
    for each group the walk runs the block once, handing every input of those layers to
    `observe`, then calls `quantize`. One group holding every layer observes the block in a
    single pass (AWQ, SmoothQuant); one group per layer makes each layer see the inputs of
    the layers quantized before it (GPTQ's true-sequential order).

    `propagate_quantized` chooses what feeds the next block: the block's output recomputed
    after quantization (its errors are then compensated downstream), or the output of the
    first observation pass (for methods whose per-block transforms keep the float function).
    """

    steps: tuple[tuple[str, ...], ...] = (BLOCK_LAYERS,)
    propagate_quantized: bool = False

    def observe(self, layer: str, x: torch.Tensor) -> None:
        """One batch of inputs (batch, T, in) of `layer` during an observation pass."""

    def quantize(self, index: int, block: nn.Module, layers: tuple[str, ...]) -> None:
        """After the pass that observed `layers` of block `index`."""

    def finish(self, index: int, block: nn.Module) -> None:
        """After the block's output for the next block was computed."""


@torch.no_grad()
def walk_blocks(model: GPT, calibration, hooks: BlockHooks, progress: bool = False,
                desc: str = "calibrate") -> torch.Tensor:
    """Walk the calibration windows through the blocks, first to last, calling `hooks` for
    each (see BlockHooks). Returns the last block's output (n, T, C), the input of ln_f."""
    xs = embed(model, calibration.ids)
    for i, block in each_block(model, desc, progress):
        first = None
        for layers in hooks.steps:
            observers = {block.get_submodule(layer): (lambda x, layer=layer: hooks.observe(layer, x))
                         for layer in layers}
            out = run_block(block, xs, hooks=observers)
            if first is None and not hooks.propagate_quantized:
                first = out  # the float block's output, kept for the next block
            hooks.quantize(i, block, layers)
        xs = run_block(block, xs) if hooks.propagate_quantized else first
        hooks.finish(i, block)
    return xs
