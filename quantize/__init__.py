"""Post-training quantization of CompactGPT models: int8 and 4-bit weights (RTN, GPTQ, AWQ),
SmoothQuant W8A8, and bitsandbytes LLM.int8 / NF4 / FP4.

    from quantize import quantize_, RTNConfig, load_quantized
    quantize_(model, RTNConfig(bits=4, group_size=128))

The quantized-weight format shared with the ONNX exporter lives in `quantize.format`.
"""

from __future__ import annotations

import importlib

from .format import QuantizedWeight, pack_int4, unpack_int4

# Heavier parts load on first use, so `quantize.format` stays importable on its own.
_LAZY = {
    "quantize_": "api", "CalibrationData": "api", "load_calibration": "api",
    "load_quantized": "artifact", "save_quantized": "artifact", "QuantizedArtifact": "artifact",
    "quantized_linears": "modules", "QuantLinear": "modules", "QuantEmbedding": "modules",
    "QuantConfig": "config", "RTNConfig": "config", "GPTQConfig": "config", "AWQConfig": "config",
    "SmoothQuantConfig": "config", "BnbInt8Config": "config", "BnbNF4Config": "config",
    "METHODS": "config", "config_for": "config",
}

__all__ = ["QuantizedWeight", "pack_int4", "unpack_int4", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
