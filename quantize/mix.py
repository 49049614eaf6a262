"""Mixed precision chosen by measurement (`--bits-per-weight B`): each quantized matrix gets the
format, among 4-bit (the config's grid), 6-bit (Q6_K) and 8-bit (Q8_0), that minimizes the KL
divergence from the float model under a budget of B bits per weight over the quantized
matrices, scales included, as a GGUF file stores them.

Measured, not guessed: `layer_sensitivities` rounds one matrix at a time to each format (the
rest float) and records the mean KL of the model's next-token distribution on the calibration
windows. `choose_bits` then treats the KL of the mix as the sum of its matrices' (a matrix's
error barely changes how much another's costs at these sizes) and spends the budget greedily
on the upgrade that buys the most KL per bit. llama.cpp's Q4_K_M spends its 6-bit tensors by
a fixed rule (the output matrix, attention values, half of the MLP down projections); NVIDIA
Model Optimizer's AutoQuantize searches per-layer formats in the same spirit.
"""

from __future__ import annotations

from typing import Callable

import torch

from compactgpt.errors import ConfigError
from compactgpt.evaluation import token_kl
from compactgpt.model import GPT
from compactgpt.progress import progress_bar

from .handlers import BLOCK_LAYERS, layer_name
from .kquant import Q6_K_BITS, Q6_K_SUPER

# Bits per weight of each format as GGUF stores it: Q4_0 / Q4_K (4.5), Q6_K (210 bytes per 256),
# Q8_0 (34 bytes per 32).
STORED_BITS = {4: 4.5, 6: 6.5625, 8: 8.5}


def choose_bits(kl: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """The bits of every matrix (name -> one of its measured formats) minimizing the summed KL
    with sum(STORED_BITS[bits] * size) <= budget * sum(size): every matrix starts at its
    smallest format and the upgrade with the largest KL saved per added bit that still fits is
    taken until none is left. Raises ConfigError when the budget is below the smallest mix."""
    total = sum(sizes.values())
    chosen = {name: min(options) for name, options in kl.items()}
    spent = sum(STORED_BITS[chosen[n]] * sizes[n] for n in chosen)
    if spent > budget * total * (1 + 1e-9):
        raise ConfigError(f"--bits-per-weight {budget:g} is below the smallest mix ({spent / total:.4g} bits per "
                          "weight: every matrix at its fewest bits); give at least that")
    while True:
        best = None
        for name, options in kl.items():
            for bits in options:
                if bits <= chosen[name]:
                    continue
                cost = (STORED_BITS[bits] - STORED_BITS[chosen[name]]) * sizes[name]
                gain = options[chosen[name]] - options[bits]
                if gain <= 0 or spent + cost > budget * total * (1 + 1e-9):
                    continue
                if best is None or gain / cost > best[0]:
                    best = (gain / cost, name, bits, cost)
        if best is None:
            return chosen
        _, name, bits, cost = best
        chosen[name] = bits
        spent += cost


def candidate_bits(base_bits: int, in_features: int) -> list[int]:
    """The formats a matrix may take: the config's bits, 6 (Q6_K: whole super-blocks of 256
    columns only) and 8."""
    return sorted({base_bits, 8} | ({Q6_K_BITS} if in_features % Q6_K_SUPER == 0 else set()))


def mix_matrices(model: GPT, include_head: bool) -> dict[str, torch.nn.Parameter]:
    """The matrices a mix assigns formats to: every block projection, and the tied embedding /
    LM head (`lm_head`) when it is quantized too."""
    out = {layer_name(i, layer): block.get_submodule(layer).weight
           for i, block in enumerate(model.transformer.h) for layer in BLOCK_LAYERS}
    if include_head:
        out["lm_head"] = model.lm_head.weight
    return out


@torch.no_grad()
def layer_sensitivities(model: GPT, ids: torch.Tensor, quantizer: Callable[[str, torch.Tensor, int], torch.Tensor],
                        formats: dict[str, list[int]], progress: bool = False) -> dict[str, dict[int, float]]:
    """name -> {bits: mean KL (nats per token) of the model with that one matrix rounded to
    `bits`} on the windows ids (n, T). quantizer(name, weight, bits) returns the rounded weight."""
    model.eval()
    device = model.lm_head.weight.device
    ids = ids.to(device)
    reference = model(ids).logits
    params = mix_matrices(model, "lm_head" in formats)
    out: dict[str, dict[int, float]] = {}
    for name in progress_bar(list(formats), desc="sensitivity", unit="matrix", enabled=progress):
        weight = params[name]
        original = weight.detach().clone()
        out[name] = {}
        for bits in formats[name]:
            weight.copy_(quantizer(name, original, bits))
            out[name][bits] = float(token_kl(reference, model(ids).logits).mean())
        weight.copy_(original)
    return out


def plan_mix(model: GPT, config, calibration, progress: bool = False, windows: int = 32) -> dict[str, int]:
    """The bits of every quantized matrix for config.bits_per_weight: sensitivities measured on
    the first `windows` calibration windows with each format rounded as the method's own grid
    rounds it (RTN on the same grid), then `choose_bits`."""
    from .rtn import rtn_quantize

    include_head = config.include_embeddings
    matrices = mix_matrices(model, include_head)
    formats = {name: candidate_bits(config.bits, w.shape[1]) for name, w in matrices.items()}  # the head too

    def quantizer(name: str, weight: torch.Tensor, bits: int) -> torch.Tensor:
        one = config.replace(module_bits={name: bits}, bits_per_weight=0.0)
        return rtn_quantize(weight, bits, one.group_for(weight.shape[1], name), one.symmetric, full=one.full,
                            grid=one.grid_for(name)).dequantize()

    sensitivities = layer_sensitivities(model, calibration.ids[:windows], quantizer, formats, progress)
    sizes = {name: w.numel() for name, w in matrices.items()}
    return choose_bits(sensitivities, sizes, config.bits_per_weight)
