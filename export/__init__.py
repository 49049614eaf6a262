"""ONNX export of CompactGPT decoders: graph built from the weights, validated against
PyTorch on every export, fused for ONNX Runtime, int8/int4 from quantize/'s integer weights,
and a runtime with a KV cache.

    from export import ExportConfig, export_onnx, OnnxDecoder
    export_onnx(ExportConfig(model="runs/small", out="runs/small-onnx"))
    decoder = OnnxDecoder("runs/small-onnx", threads=2)
"""

from .config import ExportConfig, ExportError, ParityError
from .exporter import export_onnx
from .runtime import OnnxDecoder, is_onnx_folder
from .spec import DecoderSpec

__all__ = ["DecoderSpec", "ExportConfig", "ExportError", "OnnxDecoder", "ParityError", "export_onnx", "is_onnx_folder"]
