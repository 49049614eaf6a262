"""`compactgpt export`: one flag per ExportConfig field, the export written and validated by
the export stage."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Write an ONNX decoder (one graph for prefill and decode, KV cache, dynamic batch / sequence / past "
    "axes, Optimum's input and output names) with config.json, tokenizer and genai_config.json. Every "
    "export is compared with PyTorch at several shapes before the folder is marked complete; the "
    "differences go into its manifest. A quantized artifact exports its own int8/int4 weights as MatMulNBits. "
    "--format gguf writes model.gguf for llama.cpp instead: a quantized artifact's codes as Q4_0 / Q4_1 / Q8_0 "
    "blocks, read back and checked against the artifact's weights."
)


def add_export_args(p: argparse.ArgumentParser) -> None:
    """The flags of `compactgpt export`: ExportConfig's fields, help text from the fields."""
    from export.config import ExportConfig

    from ...config import add_config_args

    p.description = DESCRIPTION
    add_config_args(p, ExportConfig)


def run_export(args: argparse.Namespace) -> None:
    """Export the model the flags name and print the folder written."""
    from export import ExportConfig, export

    from ...config import given_args

    print(export(ExportConfig(**given_args(args, ExportConfig))))
