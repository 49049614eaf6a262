"""The registries that map each config type to the function that applies it and to the
layout that stores its weights, and what those functions share: the projections of a block,
progress over blocks, swapping quantized modules into the GPT.

A method registers its handler and its layout beside its own code (torchao's pattern):

    @register_handler(GPTQConfig)
    def _gptq(model, config, calibration, progress): ...

    register_layout(GPTQConfig, GPTQ_LAYOUT)

so `quantize_` finds the handler, and `save_quantized` / `load_quantized` the layout, by the
config's type, with no list of methods to keep in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterator, NamedTuple, Protocol

import torch
import torch.nn as nn

from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.progress import progress_bar

from .config import QuantConfig
from .format import QuantizedWeight
from .kquant import SIGNED_K, check_k_width, check_q4_k_width
from .modules import QuantEmbedding, QuantLinear, set_module

# The quantized projections of every block, in forward order.
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# handler(model, config, calibration or None, progress) -> None, quantizing the model in place.
Handler = Callable[..., None]
HANDLERS: dict[type[QuantConfig], Handler] = {}


def register_handler(config_type: type[QuantConfig]) -> Callable[[Handler], Handler]:
    """Decorator: `fn` applies configs of exactly `config_type`."""

    def wrap(fn: Handler) -> Handler:
        _register(HANDLERS, config_type, fn, lambda old: f"a handler ({old.__name__})")
        return fn

    return wrap


def handler_for(config: QuantConfig) -> Handler:
    """The registered handler of the config's type. Raises ConfigError naming the known types."""
    return _registered(HANDLERS, config, "quantization handler")


def _register(table: dict, config_type: type[QuantConfig], entry, describe: Callable) -> None:
    """table[config_type] = entry; ConfigError when the type has one already (`describe` names it)."""
    if config_type in table:
        raise ConfigError(f"{config_type.__name__} already has {describe(table[config_type])}; register one "
                          "per config type")
    table[config_type] = entry


def _registered(table: dict, config: QuantConfig, what: str):
    """table's entry for the config's exact type. Raises ConfigError naming the known types."""
    entry = table.get(type(config))
    if entry is None:
        raise ConfigError(f"no {what} for {type(config).__name__}; known: {sorted(c.__name__ for c in table)}")
    return entry


class SavedLayers(NamedTuple):
    """What a layout writes for a model's quantized layers."""

    tensors: dict[str, torch.Tensor]  # "<layer>.<key>" -> tensor, in the layout's own names
    layers: set[str]  # modules whose parameters these tensors replace (their biases stay float)
    act_bits: int | None  # the blocks' activation bits, recorded in config.json


class Layout(Protocol):
    """How one storage layout writes and reads the quantized layers of a model (the float
    tensors around them are the artifact's business). One object per layout, or per method
    where a layout's details differ by method (bitsandbytes' int8 and 4-bit layers)."""

    name: ClassVar[str]  # written into config.json (quantization_config.compactgpt.layout)
    description: ClassVar[str]  # which weights it holds

    def quantization_config(self, config: QuantConfig, act_bits: int | None) -> dict:
        """The layout's own keys of config.json's `quantization_config`, in their order."""

    def save(self, model: GPT) -> SavedLayers:
        """The tensors of the model's quantized layers. Raises ConfigError when it has none."""

    def layer_names(self, header: dict) -> set[str]:
        """The quantized layers whose tensors a safetensors header (name -> entry) holds."""

    def check_layer(self, path: Path, name: str, entries: dict, config: QuantConfig, linear: nn.Linear) -> None:
        """Check one layer's tensors from the header (key within the layer -> (dtype, shape))
        against the float `linear` they replace. Raises ArtifactError naming the tensor."""

    def load_layer(self, model: GPT, name: str, tensors: dict[str, torch.Tensor], config: QuantConfig,
                   act_bits: int | None, device) -> None:
        """Put the layer at `name`, built from its tensors (key within the layer -> tensor), into the model."""

    def refusal(self, config: QuantConfig, layout: str) -> str:
        """Why another layout cannot hold the weights this one holds, and the fix."""


LAYOUT_HANDLERS: dict[type[QuantConfig], Layout] = {}


def register_layout(config_type: type[QuantConfig], layout: Layout) -> None:
    """Store configs of exactly `config_type` in `layout`."""
    _register(LAYOUT_HANDLERS, config_type, layout, lambda old: f"a layout ({old.name})")


def layout_handler(config: QuantConfig) -> Layout:
    """The layout registered for the config's type. Raises ConfigError naming the known types."""
    return _registered(LAYOUT_HANDLERS, config, "storage layout")


def layouts() -> dict[str, str]:
    """Every registered layout's name -> the weights it holds."""
    return {layout.name: layout.description for layout in LAYOUT_HANDLERS.values()}


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
            width = block.get_submodule(layer).in_features
            name = layer_name(i, layer)
            bits = config.bits_for(name)
            if bits in SIGNED_K:
                check_k_width(width, name, SIGNED_K[bits].name, "give it other bits")
            elif config.grid == "k":
                check_q4_k_width(width, name)
            config.group_for(width, name)
    if config.include_embeddings and config.integer_weights:
        width = model.config.n_embd
        bits = config.bits_for("lm_head")
        if bits in SIGNED_K:
            check_k_width(width, "lm_head", SIGNED_K[bits].name, f"choose other --head-bits than {bits}")
        else:
            config.group_for(width, "lm_head")
