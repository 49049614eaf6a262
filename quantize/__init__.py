"""Post-training quantization of CompactGPT models: int8 and 4-bit weights (RTN, GPTQ, AWQ),
SmoothQuant W8A8, and bitsandbytes LLM.int8 / NF4 / FP4.

    from quantize import quantize_, RTNConfig, load_quantized
    quantize_(model, RTNConfig(bits=4, group_size=128))
    quantize_folder(QuantizeConfig(model="runs/teacher", out="runs/teacher-gptq4", method=GPTQConfig(group_size=32)))

Each method's handler is registered beside its code (`register_handler`); calibrated methods
share one block walk (`walk_blocks`). The quantized-weight format shared with the ONNX
exporter lives in `quantize.format`. This package imports no stage after it (export) and no
part of the application (compactgpt.app).
"""

from __future__ import annotations

import importlib

from compactgpt.artifacts import register_folder_kind

from .format import QuantizedWeight, pack_int4, unpack_int4

# A quantized model's config.json names its quantization_config: the kind of folder this stage writes.
register_folder_kind("quantized", "a model with quantized weights, run by its PyTorch layers",
                     lambda files: "quantization_config" in files.config, rank=3, marker="config.json")

# Heavier parts load on first use, so `quantize.format` stays importable on its own and
# importing `quantize` loads neither torch-heavy method code nor bitsandbytes.
_LAZY = {
    "quantize_": "api", "QuantizeReport": "api",
    "CalibrationData": "calibrate", "walk_blocks": "calibrate",
    "BlockHooks": "calibrate",
    "register_handler": "handlers", "handler_for": "handlers", "register_layout": "handlers",
    "layout_handler": "handlers",
    "load_quantized": "artifact", "save_quantized": "artifact", "QuantizedArtifact": "artifact",
    "quantized_linears": "modules", "QuantLinear": "modules", "QuantEmbedding": "modules",
    "QuantConfig": "config", "RTNConfig": "config", "GPTQConfig": "config", "AWQConfig": "config",
    "SmoothQuantConfig": "config", "BnbInt8Config": "config", "BnbNF4Config": "config",
    "METHODS": "config", "config_for": "config", "config_from_dict": "config",
    "quantize_folder": "stage", "QuantizeConfig": "stage", "evaluate_quantized": "stage",
    "resolve_calibration": "stage",
}

__all__ = ["QuantizedWeight", "pack_int4", "unpack_int4", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
