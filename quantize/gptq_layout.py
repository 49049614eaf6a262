"""The "gptq" storage layout: integer weights (`QuantLinear`, and a quantized tied embedding /
LM head stored once as `lm_head.*`) as the GPTQ checkpoint tensors transformers reads
(`qweight`, `qzeros`, `scales`, `g_idx`; see quantize.format). RTN, GPTQ, AWQ and SmoothQuant
register it beside their handlers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from compactgpt.errors import ConfigError
from compactgpt.model import GPT

from .config import QuantConfig
from .format import check_gptq_header, from_gptq_tensors, gptq_tensors
from .handlers import SavedLayers
from .kquant import SIGNED_K
from .modules import QuantEmbedding, QuantLinear, quantized_linears, set_module


def _overrides(config: QuantConfig) -> dict:
    """Per-module overrides as GPTQModel writes them (a regex on the module name -> settings): the
    layers whose bits differ from --bits, at the width their codes are stored at: Q3_K's as 4-bit
    codes in groups of 16, Q5_0's as 8-bit codes, Q6_K's as 8-bit codes in groups of 16."""
    names = sorted(set(config.module_bits) | ({"lm_head"} if config.include_embeddings else set()))
    out = {}
    for name in names:
        bits = config.bits_for(name)
        if bits != config.bits:
            entry = {"bits": config.stored_bits_for(name)}
            if bits in SIGNED_K:
                entry["group_size"] = SIGNED_K[bits].group
            if config.symmetric_for(name) != config.symmetric:
                entry["sym"] = True
            out[f"+:^{re.escape(name)}$"] = entry
    return out


class GPTQLayout:
    """Integer weights with scales and zero points, in the GPTQ checkpoint format."""

    name = "gptq"
    description = "integer weights with scales and zero points (rtn, gptq, awq, smoothquant)"

    def quantization_config(self, config: QuantConfig, act_bits: int | None) -> dict:
        """transformers' GPTQ entry (`quant_method: gptq`, `checkpoint_format: gptq`)."""
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": config.bits,
            "group_size": config.group_size or -1,
            "sym": config.symmetric,
            "desc_act": False,  # groups are contiguous (static groups), so no g_idx reordering
            "true_sequential": True,
            "lm_head": config.include_embeddings,
            # Per-module overrides as GPTQModel writes them (a regex on the module name): the head's bits.
            **({"dynamic": overrides} if (overrides := _overrides(config)) else {}),
        }

    def save(self, model: GPT) -> SavedLayers:
        """Every QuantLinear's GPTQ tensors; the quantized embedding shares the LM head's."""
        layers = quantized_linears(model)
        if not layers:
            raise ConfigError("the model has no quantized layers to save; run quantize_ first")
        tensors = {f"{name}.{key}": t.cpu() for name, m in layers.items() for key, t in gptq_tensors(m.qweight).items()}
        skip = set(layers)
        if isinstance(model.transformer.wte, QuantEmbedding):
            skip.add("transformer.wte")
        act_bits = {m.act_bits for m in layers.values() if m is not model.lm_head}
        return SavedLayers(tensors, skip, act_bits.pop() if len(act_bits) == 1 else None)

    def layer_names(self, header: dict) -> set[str]:
        """Layers with a `qweight`."""
        return {k.rsplit(".", 1)[0] for k in header if k.endswith(".qweight")}

    def check_layer(self, path: Path, name: str, entries: dict, config: QuantConfig, linear: nn.Linear) -> None:
        """GPTQ words and scales of the layer's bits and shape (see format.check_gptq_header)."""
        check_gptq_header(path, name, entries, config.stored_bits_for(name), linear.in_features, linear.out_features)

    def load_layer(self, model: GPT, name: str, tensors: dict[str, torch.Tensor], config: QuantConfig,
                   act_bits: int | None, device) -> None:
        """A QuantLinear (for `lm_head`, the head and the tied embedding sharing one weight)."""
        # On the device before the modules are built: the tied embedding and LM head then
        # share one QuantizedWeight there too (moving the model keeps weights already in place).
        qw = from_gptq_tensors(tensors, config.stored_bits_for(name), name).to(device)
        if name == "lm_head":
            model.lm_head = QuantLinear(qw, None)
            model.transformer.wte = QuantEmbedding(qw)
        else:
            set_module(model, name, QuantLinear(qw, tensors.get("bias"), act_bits))

    def refusal(self, config: QuantConfig, layout: str) -> str:
        """Affine integer groups have no other layout."""
        return (f"{config.method} produces affine integer weights, which the {layout!r} layout cannot hold; save "
                "with --layout gptq")


GPTQ_LAYOUT = GPTQLayout()
