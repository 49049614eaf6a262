"""The registry that maps each config type to the function that applies it, and what those
functions share: the projections of a block, progress over blocks, swapping quantized
modules into the GPT.

A method registers its handler beside its own code (torchao's pattern):

    @register_handler(GPTQConfig)
    def _gptq(model, config, calibration, progress): ...

so `quantize_` finds it by the config's type, with no list of methods to keep in step.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.progress import progress_bar

from .config import QuantConfig
from .format import QuantizedWeight
from .modules import QuantEmbedding, QuantLinear, set_module

# The quantized projections of every block, in forward order.
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# handler(model, config, calibration or None, progress) -> None, quantizing the model in place.
Handler = Callable[..., None]
HANDLERS: dict[type[QuantConfig], Handler] = {}


def register_handler(config_type: type[QuantConfig]) -> Callable[[Handler], Handler]:
    """Decorator: `fn` applies configs of exactly `config_type`."""

    def wrap(fn: Handler) -> Handler:
        if config_type in HANDLERS:
            raise ConfigError(f"{config_type.__name__} already has a handler ({HANDLERS[config_type].__name__})")
        HANDLERS[config_type] = fn
        return fn

    return wrap


def handler_for(config: QuantConfig) -> Handler:
    """The registered handler of the config's type. Raises ConfigError naming the known types."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"no quantization handler for {type(config).__name__}; known: "
                          f"{sorted(c.__name__ for c in HANDLERS)}")
    return handler


def each_block(model: GPT, desc: str, progress: bool) -> Iterator[tuple[int, nn.Module]]:
    """(index, block) over the model's transformer blocks, with a progress bar if asked."""
    return enumerate(progress_bar(list(model.transformer.h), desc=desc, unit="block", enabled=progress))


def each_projection(model: GPT, desc: str, progress: bool) -> Iterator[tuple[str, nn.Module]]:
    """(GPT-wide name, module) of every block's projections, block by block in forward order
    (a progress bar counts blocks). Replacing the module just yielded is safe."""
    for i, block in each_block(model, desc, progress):
        for layer in BLOCK_LAYERS:
            yield layer_name(i, layer), block.get_submodule(layer)


def layer_name(index: int, layer: str) -> str:
    """The GPT-wide name of one block's projection, e.g. transformer.h.0.attn.c_attn."""
    return f"transformer.h.{index}.{layer}"


def replace_linear(model: GPT, name: str, qw: QuantizedWeight, act_bits: int | None = None) -> None:
    """Swap the linear at `name` for a QuantLinear holding `qw` and the linear's bias."""
    lin = model.get_submodule(name)
    set_module(model, name, QuantLinear(qw, lin.bias, act_bits))


def quantize_embeddings(model: GPT, qw: QuantizedWeight) -> None:
    """Tied embedding and LM head share one quantized weight, and the position table, the one
    float table left, is rounded to float16 (stored so; the ONNX export keeps it in float16
    too). Measured on the default pipeline's teacher: perplexity and KL from fp32 move by under
    1e-7 relative, and an int4 g32 export of a 12 x 768 model drops from 5.39 to 5.26 bits per
    parameter."""
    model.lm_head = QuantLinear(qw, None)
    model.transformer.wte = QuantEmbedding(qw)
    wpe = model.transformer.wpe.weight
    with torch.no_grad():
        wpe.copy_(wpe.to(torch.float16).to(wpe.dtype))


def check_groups(model: GPT, config: QuantConfig) -> None:
    """Fail before any work when the group size does not divide a layer's width."""
    for i, block in enumerate(model.transformer.h):
        for layer in BLOCK_LAYERS:
            config.group_for(block.get_submodule(layer).in_features, layer_name(i, layer))
