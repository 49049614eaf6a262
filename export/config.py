"""ExportConfig: every setting of `compactgpt export`, validated, saved into the manifest."""

from __future__ import annotations

from dataclasses import dataclass

from compactgpt.config import StageConfig, option, run_option
from compactgpt.errors import ConfigError

from .errors import ExportError, ParityError
from .spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

__all__ = ["DTYPES", "EXTERNAL_DATA", "FORMATS", "GGUF_TYPES", "INT8_KERNELS", "KV_CACHES", "EXTERNAL_DATA_AUTO_BYTES", "ExportConfig", "ExportError", "ParityError"]

DTYPES = ("fp32", "fp16")
EXTERNAL_DATA = ("auto", "always", "never")
INT8_KERNELS = ("matmulnbits", "dynamic")
KV_CACHES = ("copy", "shared")
FORMATS = ("onnx", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")
# Protobuf refuses messages over 2 GiB; "auto" moves weights to model.onnx.data well before that.
EXTERNAL_DATA_AUTO_BYTES = 1 << 30


@dataclass
class ExportConfig(StageConfig):
    """Settings of one export. Fields map one-to-one to `compactgpt export` flags."""

    model: str = option("", "artifact folder to export: a float model, or a quantized one (its int8/int4 "
                        "weights are exported as they are)")
    out: str = option("", "folder to write (model.onnx, config.json, tokenizer, genai_config.json, manifest.json; "
                      "with --format gguf: model.gguf, config.json, tokenizer, manifest.json)")
    dtype: str = option("fp32", "fp32 (default) or fp16 (half the size; meant for the CUDA provider)")
    optimize: bool = option(True, "fused ONNX Runtime ops (SkipLayerNormalization, FastGelu, MultiHeadAttention; "
                            "default). --no-optimize writes standard ONNX ops only, for other runtimes")
    opset: int = option(DEFAULT_OPSET, "ONNX opset (default 17, the oldest with LayerNormalization)")
    # 4 is the default: int8 activations let single-token decode on CPU use the integer dot-product
    # kernels (benchmarks/results/ has the figures).
    accuracy_level: int = option(4, "MatMulNBits compute type for quantized weights: 0 float activations "
                                 "(weight-only; measured on int8: 0.35x the KL but 10x slower decode on CPU), 4 int8 "
                                 "activations (default; benchmarks/results/int8_kernels.md)")
    # Opt-in: per-tensor activations are coarser than matmulnbits' per-block ones
    # (benchmarks/results/decode_bandwidth.md and decode_quality.md have the speed and the cost).
    int8_kernel: str = option("matmulnbits", added=True, help="kernel of int8 weights (blocks and a quantized LM "
                              "head): matmulnbits (default; int8 activations quantized per block) or dynamic (ONNX "
                              "Runtime's DynamicQuantizeMatMul: per-tensor activations, signed per-channel weights, the "
                              "lookup reading the head's codes; can decode faster on CPU, slightly less accurate; "
                              "needs per-channel int8, quantize --group-size 0)")
    kv_cache: str = option("copy", added=True, help="copy (default: MultiHeadAttention returns a new present KV "
                           "each step, any batch "
                           "padding) or shared (GroupQueryAttention writes into one preallocated buffer bound as past "
                           "and present: decode step time stays flat as the text grows; rows may not be left-padded)")
    format: str = option("onnx", added=True, help="onnx (default: model.onnx for ONNX Runtime) or gguf (model.gguf "
                         "for llama.cpp: a quantized artifact's codes written as they are, Q4_0 / Q4_1 / Q5_0 / Q8_0 / "
                         "Q3_K / Q4_K / Q6_K; the tokenizer inside)")
    gguf_type: str = option("f32", added=True, help="--format gguf of a float model: f32 (default), f16 or q8_0 "
                            "(rounded by llama.cpp's own grid); a quantized artifact keeps its codes")
    ort_int8: bool = option(False, "baseline: quantize the float export with ONNX Runtime's dynamic int8 "
                            "(MatMulInteger)")
    external_data: str = option("auto", "weights in model.onnx.data: auto (over 1 GiB; default), always, never")
    ort_format: bool = option(False, "also write model.ort (ONNX Runtime mobile / minimal builds) and its "
                              "operator list")
    atol: float = option(1e-4, "float exports: largest allowed |ONNX - PyTorch| of logits and KV (default 1e-4)")
    # Quantized kernels round activations differently from PyTorch: a relative bound, not atol.
    quant_rtol: float = option(0.05, "quantized exports: largest allowed max|diff| / max|logits| against the "
                               "PyTorch quantized model (default 0.05)")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    threads: int | None = run_option("threads", "CPU threads of ONNX Runtime and PyTorch during validation")
    overwrite: bool = run_option("overwrite")

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting and the fix."""
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not supported; use one of {FORMATS}")
        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"gguf_type {self.gguf_type!r} is not supported; use one of {GGUF_TYPES}")
        if self.format == "gguf" and (self.ort_int8 or self.ort_format):
            raise ConfigError("--ort-int8 and --ort-format make ONNX Runtime files; drop them for --format gguf")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        if self.opset < MIN_OPSET:
            raise ConfigError(
                f"opset {self.opset} is too old for this decoder: LayerNormalization needs opset "
                f"{MIN_OPSET}; use --opset {MIN_OPSET} or newer"
            )
        if self.opset > MAX_OPSET:
            raise ConfigError(
                f"opset {self.opset} is newer than this exporter knows (<= {MAX_OPSET}); use --opset {DEFAULT_OPSET}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0..4 (MatMulNBits), got {self.accuracy_level}")
        if self.int8_kernel not in INT8_KERNELS:
            raise ConfigError(f"int8_kernel {self.int8_kernel!r}: use one of {INT8_KERNELS}")
        if self.int8_kernel == "dynamic" and (self.accuracy_level == 0 or self.dtype != "fp32"):
            raise ConfigError("--int8-kernel dynamic quantizes fp32 activations to int8: it needs --dtype fp32 and "
                              "--accuracy-level 4; use --int8-kernel matmulnbits otherwise")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache {self.kv_cache!r}: use one of {KV_CACHES}")
        if self.kv_cache == "shared" and not self.optimize:
            raise ConfigError("--kv-cache shared rewrites the fused attention: drop --no-optimize")
        if self.external_data not in EXTERNAL_DATA:
            raise ConfigError(f"external_data {self.external_data!r}: use one of {EXTERNAL_DATA}")
        if self.atol <= 0 or self.quant_rtol <= 0:
            raise ConfigError("atol and quant_rtol must be positive")
