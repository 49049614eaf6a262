"""Low-rank adapters (LoRA) on the attention and MLP projections.

`apply_lora` freezes every weight of the model and wraps the chosen `nn.Linear` projections
in `LoRALinear`: y = W x + b + (alpha / r) * B (A x), with A (r, in) and B (out, r). B starts
at zero, so the adapted model begins exactly where the base model is. `merge_lora` folds
each adapter into its base weight (W + (alpha / r) * B A) and puts a plain `nn.Linear` back,
so a finetuned model saves as an ordinary artifact that every later stage (pruning,
distillation, quantization, ONNX export) reads without knowing adapters existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

# The projections of a GPT-2 block, by their suffix in the module tree.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A: the plain weight that computes what base + adapter compute."""
    return weight + scale * (lora_b @ lora_a)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # As in the LoRA paper: A random, B zero, so the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls rather than materializing B @ A (out x in) at every step.
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded into its weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(merged_weight(self.base.weight, self.lora_a, self.lora_b, self.scale))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS,
               train_also: tuple[str, ...] = ()) -> int:
    """Freeze `model` and wrap every nn.Linear whose name ends with one of `targets`.

    train_also: name prefixes of modules that stay trainable in full (a new classification
    head, which has no pretrained weight to adapt). Returns the number of wrapped layers.
    Raises ConfigError when no module matches, so a wrong target list never trains nothing.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(targets):
            _replace_module(model, name, LoRALinear(module, rank, alpha))
            wrapped += 1
    if not wrapped:
        raise ConfigError(f"no linear layer of the model matches the LoRA targets {list(targets)}")
    for prefix in train_also:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear in `model` by its merged nn.Linear, in place, and make every
    parameter trainable again (an ordinary model). Returns the number merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace_module(model, name, module.merged())
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of a module, each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
