"""Training FLOPs per token and GPU peaks: the figures behind tokens/s, TFLOPS and model FLOPs
utilization in the log."""

from __future__ import annotations

import torch

from ..model import GPTConfig


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per parameter plus attention's
    12 * layers * width * sequence (the PaLM appendix estimate)."""
    n = config.n_layer * (4 * config.n_embd**2 + 2 * config.n_embd * config.n_inner)  # blocks
    n += config.vocab_size * config.n_embd  # the LM head matmul
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


# Dense bf16 tensor-core peaks, for model FLOPs utilization on known GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
