"""ONNX export of CompactGPT decoders: graph built from the weights, validated against
PyTorch on every export (names and axes first, then values), fused for ONNX Runtime,
int8/int4 from quantize/'s integer weights, and a runtime with a KV cache.

    from export import ExportConfig, export_onnx, OnnxDecoder
    export_onnx(ExportConfig(model="runs/small", out="runs/small-onnx"))
    decoder = OnnxDecoder("runs/small-onnx", threads=2)
    export(ExportConfig(model="runs/small-int4", out="runs/small-gguf", format="gguf"))  # llama.cpp

Importing the package loads neither onnx nor onnxruntime: they are imported by the functions
that build, save or run a graph.
"""

import quantize  # noqa: F401  (registers the "quantized" folder kind, which load_source tells apart)
from compactgpt.artifacts import register_folder_kind

from .config import ExportConfig
from .errors import (AxisError, ExportError, InputNameError, OutputNameError, OutputShapeError, ParityError,
                     SignatureError)
from .exporter import export, export_onnx
from .gguf import GGUF_FILE
from .runtime import OnnxDecoder, is_onnx_folder, open_decoder
from .spec import MODEL_FILE, DecoderSpec

# An ONNX graph is what this stage writes; a folder holding one is an export.
register_folder_kind("onnx", "an ONNX export with its tokenizer, run by ONNX Runtime",
                     lambda files: (files.path / MODEL_FILE).is_file(), rank=4, marker=MODEL_FILE)
register_folder_kind("gguf", "a GGUF file with its tokenizer inside, run by llama.cpp",
                     lambda files: (files.path / GGUF_FILE).is_file(), rank=4, marker=GGUF_FILE)

__all__ = ["AxisError", "DecoderSpec", "ExportConfig", "ExportError", "InputNameError", "OnnxDecoder",
           "OutputNameError", "OutputShapeError", "ParityError", "SignatureError", "export", "export_onnx", "is_onnx_folder",
           "open_decoder"]
