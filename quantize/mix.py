"""Mixed precision chosen by measurement (`--bits-per-weight B`): each quantized matrix gets the
format, among Q3_K, 4-bit (the config's grid), Q5_0, Q6_K and Q8_0, that minimizes the KL
divergence from the float model under a budget of B bits per weight over the quantized
matrices, scales included, as a GGUF file stores them.

Measured, not guessed: `layer_sensitivities` quantizes one matrix at a time to each format
(GPTQ's solve on the float model's inputs, the rest float) and records the mean KL of the
model's next-token distribution on the calibration windows. `choose_bits` then treats the KL
of the mix as the sum of its matrices' (a matrix's error barely changes how much another's
costs at these sizes) and finds the mix with the
least summed KL that fits the budget exactly, by dynamic programming over the bytes spent (a
multiple-choice knapsack): it can take bits from several blocks to give them to one large
matrix (the tied embedding / LM head of a small model), which no one-step-at-a-time rule
finds. llama.cpp's Q4_K_M and Q3_K_M spend their wider tensors by fixed rules (the output
matrix, attention values, half of the MLP down projections); NVIDIA Model Optimizer's
AutoQuantize searches per-layer formats in the same spirit.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Callable

import numpy as np
import torch

from compactgpt.errors import ConfigError
from compactgpt.evaluation import token_kl
from compactgpt.model import GPT
from compactgpt.progress import progress_bar

from .calibrate import BlockHooks, CalibrationData, walk_blocks
from .gptq import _solve, accumulate_hessian
from .handlers import BLOCK_LAYERS, layer_name
from .kquant import K_SUPER, SIGNED_K

# Bytes per 256 weights of each format as GGUF stores it: Q4_0 / Q4_K 144, Q5_0 176, Q8_0 272;
# the symmetric K-quants from their own layout (Q3_K 110, Q6_K 210).
BYTES_PER_256 = {4: 144, 5: 176, 8: 272, **{k.bits: round(32 * k.bits_per_weight) for k in SIGNED_K.values()}}
STORED_BITS = {bits: 8 * size / 256 for bits, size in BYTES_PER_256.items()}


def choose_bits(kl: dict[str, dict[int, float]], sizes: dict[str, int], budget: float,
                max_states: int = 1 << 16) -> dict[str, int]:
    """The bits of every matrix (name -> one of its measured formats) minimizing the summed KL
    with sum(STORED_BITS[bits] * size) <= budget * sum(size).

    Exact by dynamic programming over the bytes spent, in units of the greatest common divisor
    of every option's size; when that would take more than `max_states` steps the unit is
    coarser and every cost rounded up, so the mix found always fits. Of equal sums, the fewer
    bits. Raises ConfigError when the budget is below the smallest mix."""
    names = list(kl)
    options = {n: sorted(kl[n]) for n in names}
    total = sum(sizes[n] for n in names)
    smallest = sum(STORED_BITS[min(kl[n])] * sizes[n] for n in names)
    capacity = budget * total * 32  # in 1/256 bytes: a matrix's bits times 32 is its size times BYTES_PER_256
    if smallest > budget * total * (1 + 1e-9):
        raise ConfigError(f"--bits-per-weight {budget:g} is below the smallest mix ({smallest / total:.4g} bits per "
                          "weight: every matrix at its fewest bits); give at least that")
    costs = {n: {b: sizes[n] * BYTES_PER_256[b] for b in kl[n]} for n in names}
    unit = reduce(math.gcd, (c for options in costs.values() for c in options.values()))
    unit = max(unit, math.ceil(capacity / max_states))
    steps = {n: {b: math.ceil(c / unit) for b, c in options.items()} for n, options in costs.items()}
    cap = int(math.floor(capacity * (1 + 1e-9) / unit))
    # least[j]: the least summed KL of the matrices so far within j units; choice[i, j] the
    # format matrix i takes there.
    least = np.zeros(cap + 1)
    choice = np.zeros((len(names), cap + 1), dtype=np.int8)
    for i, n in enumerate(names):
        nxt = np.full(cap + 1, np.inf)
        for k, b in enumerate(options[n]):
            c = steps[n][b]
            if c > cap:
                continue
            candidate = np.full(cap + 1, np.inf)
            candidate[c:] = least[:cap + 1 - c] + kl[n][b]
            better = candidate < nxt
            nxt = np.where(better, candidate, nxt)
            choice[i] = np.where(better, k, choice[i])
        least = nxt
    if not np.isfinite(least[cap]):  # the rounding-up of a coarse unit left no mix
        return {n: min(kl[n]) for n in names}
    chosen, j = {}, cap
    for i in range(len(names) - 1, -1, -1):
        n = names[i]
        b = options[n][choice[i, j]]
        chosen[n] = b
        j -= steps[n][b]
    return {n: chosen[n] for n in names}


def candidate_bits(base_bits: int, in_features: int) -> list[int]:
    """The formats a matrix may take: Q3_K and Q6_K (whole super-blocks of 256 columns only),
    the config's bits, Q5_0 and Q8_0."""
    k_quants = set(SIGNED_K) if in_features % K_SUPER == 0 else set()
    return sorted({base_bits, 5, 8} | k_quants)


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


class _FloatInputs(BlockHooks):
    """The Hessian (sum x x^T, float64) of every block projection's inputs in the float model,
    collected in one observation pass per block."""

    def __init__(self):
        self.block: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] = {}

    def observe(self, layer: str, x: torch.Tensor) -> None:
        self.block[layer] = accumulate_hessian(self.block.get(layer), x)

    def quantize(self, index: int, block, layers: tuple[str, ...]) -> None:
        self.hessians.update({layer_name(index, layer): H for layer, H in self.block.items()})
        self.block = {}


def input_hessians(model: GPT, calibration, include_head: bool) -> dict[str, torch.Tensor]:
    """name -> sum x x^T of the inputs each block projection (and the LM head, the final
    LayerNorm's output, when include_head) sees in the float model on the calibration windows:
    the walk every calibrated method takes (`quantize.calibrate.walk_blocks`), quantizing nothing."""
    hooks = _FloatInputs()
    xs = walk_blocks(model, calibration, hooks)
    if include_head:
        hooks.hessians["lm_head"] = accumulate_hessian(None, model.transformer.ln_f(xs))
    return hooks.hessians


def plan_mix(model: GPT, config, calibration, progress: bool = False, windows: int = 32) -> dict[str, int]:
    """The bits of every quantized matrix for config.bits_per_weight: sensitivities measured on
    the first `windows` calibration windows with each format solved as GPTQ solves it (each
    matrix alone, on the float model's inputs), then `choose_bits`.

    GPTQ's own solve, not rounding: it lowers the blocks' KL three to eight times and the tied
    embedding / head's 1.3 times (its error as the token lookup is not compensated; measured
    on the default pipeline's distilled student), so sensitivities from rounding alone
    overprice the blocks against the head and the budget goes to the wrong matrices."""
    include_head = config.include_embeddings
    matrices = mix_matrices(model, include_head)
    formats = {name: candidate_bits(config.bits, w.shape[1]) for name, w in matrices.items()}  # the head too
    ids = calibration.ids[:windows]
    hessians = input_hessians(model, CalibrationData(ids, calibration.source), include_head)

    def quantizer(name: str, weight: torch.Tensor, bits: int) -> torch.Tensor:
        one = config.replace(module_bits={name: bits}, bits_per_weight=0.0)
        return _solve(weight, hessians[name], one, name).dequantize().to(weight.dtype)

    sensitivities = layer_sensitivities(model, ids, quantizer, formats, progress)
    sizes = {name: w.numel() for name, w in matrices.items()}
    return choose_bits(sensitivities, sizes, config.bits_per_weight)
