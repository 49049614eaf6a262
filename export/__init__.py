"""ONNX export of CompactGPT decoders: graph built from the weights, validated against
PyTorch on every export (names and axes first, then values), fused for ONNX Runtime,
int8/int4 from quantize/'s integer weights, and a runtime with a KV cache.

    from export import ExportConfig, export_onnx, OnnxDecoder
    export_onnx(ExportConfig(model="runs/small", out="runs/small-onnx"))
    decoder = OnnxDecoder("runs/small-onnx", threads=2)

Importing the package loads neither onnx nor onnxruntime: they are imported by the functions
that build, save or run a graph.
"""

from .config import ExportConfig
from .errors import (AxisError, ExportError, InputNameError, OutputNameError, OutputShapeError, ParityError,
                     SignatureError)
from .exporter import export_onnx
from .runtime import OnnxDecoder, is_onnx_folder, open_decoder
from .spec import DecoderSpec

__all__ = ["AxisError", "DecoderSpec", "ExportConfig", "ExportError", "InputNameError", "OnnxDecoder",
           "OutputNameError", "OutputShapeError", "ParityError", "SignatureError", "export_onnx", "is_onnx_folder",
           "open_decoder"]
