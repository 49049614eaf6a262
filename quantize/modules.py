"""PyTorch modules that run quantized weights, for evaluation and as the exporter's source.

`QuantLinear` holds a `QuantizedWeight` (`.qweight`), a float bias and `act_bits` (None for
weight-only, 8 for SmoothQuant's dynamic per-token int8 activations). It computes with the
dequantized weight, cached once: on a CPU this is as fast as float and gives exactly the
function the integer weights define. `QuantEmbedding` reads rows of a quantized token
embedding; when the embedding is tied to the LM head both share one `QuantizedWeight`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .format import QuantizedWeight


def quantize_activations_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric dynamic quantization of each token's features, returned dequantized.

    The step of every token (last-dim row) is max|x| / (2**(bits-1) - 1), as int8 GEMM kernels
    that take per-token activation scales compute it.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


class QuantLinear(nn.Module):
    """A linear layer with integer weights (see the module docstring)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act_bits: int | None = None):
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.act_bits = act_bits
        self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False) if bias is not None else None
        self.register_buffer("weight", qweight.dequantize(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = quantize_activations_per_token(x, self.act_bits)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # Keep the integer weights on the module's device alongside the cached float weight.
        out = super()._apply(fn, recurse)
        self.qweight = self.qweight.to(self.weight.device)
        return out

    def extra_repr(self) -> str:
        q = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={q.bits}, "
                f"group_size={q.group_size}, act_bits={self.act_bits}, act_order={q.g_idx is not None}")


class QuantEmbedding(nn.Module):
    """Token embedding rows read from a quantized (vocab, width) weight."""

    def __init__(self, qweight: QuantizedWeight):
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.codes.shape
        self.register_buffer("weight", qweight.dequantize(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.qweight = self.qweight.to(self.weight.device)
        return out


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear in the model, keyed by its name in the GPT (e.g. transformer.h.0.attn.c_attn)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def projection_names(n_layer: int) -> list[str]:
    """The attention and MLP projections of a GPT, in forward order."""
    out = []
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        out += [f"{p}.attn.c_attn", f"{p}.attn.c_proj", f"{p}.mlp.c_fc", f"{p}.mlp.c_proj"]
    return out
