"""`compactgpt export`, and `compactgpt generate` on ONNX folders."""

from __future__ import annotations

import sys

from compactgpt.cli import add_config_args

from .config import ExportConfig

EXPORT_HELP = {
    "model": "artifact folder to export: a float model, or a quantized one (its int8/int4 weights are exported as they are)",
    "out": "folder to write (model.onnx, config.json, tokenizer, genai_config.json, manifest.json)",
    "dtype": "fp32 (default) or fp16 (half the size; meant for the CUDA provider)",
    "optimize": "fused ONNX Runtime ops (SkipLayerNormalization, FastGelu, MultiHeadAttention; default). "
                "--no-optimize writes standard ONNX ops only, for other runtimes",
    "opset": "ONNX opset (default 17, the oldest with LayerNormalization)",
    "accuracy_level": "MatMulNBits compute type for quantized weights: 0 float activations, 4 int8 "
                      "activations (default; several times faster for single-token decode on CPU)",
    "ort_int8": "baseline: quantize the float export with ONNX Runtime's dynamic int8 (MatMulInteger)",
    "external_data": "weights in model.onnx.data: auto (over 1 GiB; default), always, never",
    "atol": "float exports: largest allowed |ONNX - PyTorch| of logits and KV (default 1e-4)",
    "quant_rtol": "quantized exports: largest allowed max|diff| / max|logits| against the PyTorch "
                  "quantized model (default 0.05)",
    "threads": "ONNX Runtime threads during validation",
    "ort_format": "also write model.ort (ONNX Runtime mobile / minimal builds) and its operator list",
}


def cmd_export(args) -> None:
    from .exporter import export_onnx

    given = {k: getattr(args, k) for k in ExportConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    out = export_onnx(ExportConfig(**given))
    print(out)


def onnx_decoder(args):
    """The decoder and tokenizer `compactgpt generate` streams from for an ONNX folder."""
    from .runtime import OnnxDecoder

    decoder = OnnxDecoder(args.model, device=getattr(args, "device", None) or "cpu", threads=args.threads)
    if decoder.tokenizer is None:
        from compactgpt.errors import ArtifactError

        raise ArtifactError(f"{args.model} has no tokenizer.json; re-export it with `compactgpt export`")
    return decoder, decoder.tokenizer


def register(subparsers, commands: dict) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX with a KV cache (validated against PyTorch)",
        description="Write an ONNX decoder (one graph for prefill and decode, KV cache, dynamic batch / "
        "sequence / past axes, Optimum's input and output names) with config.json, tokenizer and "
        "genai_config.json. Every export is compared with PyTorch at several shapes before the folder "
        "is marked complete; the differences go into its manifest. A quantized artifact exports its own "
        "int8/int4 weights as MatMulNBits.",
    )
    add_config_args(p, ExportConfig, EXPORT_HELP)
    commands["export"] = cmd_export
