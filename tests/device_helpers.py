"""What the device tests share: a model on the `meta` device and a spy on the devices its
modules receive their inputs on.

A model on `meta` holds no data, so a test can tell whether a stage moves token ids to the
model's device without a GPU: some meta kernels accept CPU inputs silently (an embedding
lookup does), so the test also records where every module's input tensors were."""

from __future__ import annotations

import torch
import torch.nn as nn


def input_devices(model: nn.Module) -> tuple[list[tuple[str, torch.device]], list]:
    """Register forward pre-hooks on every submodule of `model`; returns (the list the hooks
    fill with (module name, input device) pairs, the hook handles to remove)."""
    seen: list[tuple[str, torch.device]] = []
    handles = []
    for name, module in model.named_modules():
        def hook(mod, args, name=name):
            for a in args:
                if isinstance(a, torch.Tensor):
                    seen.append((name, a.device))
        handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def off_device(seen: list[tuple[str, torch.device]], device: str = "meta") -> list[tuple[str, str]]:
    """The (module, device) pairs of inputs that were not on `device`."""
    return [(name, str(d)) for name, d in seen if d.type != device]
