"""Where a model runs: one rule for every verb that runs a PyTorch model.

`--device auto` (the default) is the first CUDA GPU when one is visible, else the CPU;
`cuda` without a visible GPU is a clear error rather than a crash deep inside a kernel.
Tensors are moved explicitly to the device of the model that consumes them (`device_of`),
never assumed to be on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from .errors import ConfigError

DEVICE_HELP = "auto (CUDA when a GPU is visible, else CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch.device a --device setting names. `auto` and a bare `cuda` pick the GPU of
    this process's local rank (under torchrun, one GPU per process)."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"--device {spec!r} is not a device ({e}); use {DEVICE_HELP}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec} was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's intra-op CPU threads set to `threads` inside the block (None: left as they are),
    and restored after it, so a stage called from Python leaves its caller's setting alone."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)
