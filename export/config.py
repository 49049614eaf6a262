"""ExportConfig: every setting of `compactgpt export`, validated, saved into the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from compactgpt.errors import CompactGPTError, ConfigError

from .spec import DEFAULT_OPSET, MIN_OPSET

DTYPES = ("fp32", "fp16")
EXTERNAL_DATA = ("auto", "always", "never")
# Protobuf refuses messages over 2 GiB; "auto" moves weights to model.onnx.data well before that.
EXTERNAL_DATA_AUTO_BYTES = 1 << 30


class ExportError(CompactGPTError):
    """An export that cannot be built as asked (an operator the opset lacks, a layout
    MatMulNBits cannot hold, ...)."""


class ParityError(CompactGPTError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance: the export is wrong."""


@dataclass
class ExportConfig:
    """Settings of one export. Fields map one-to-one to `compactgpt export` flags."""

    model: str = ""  # artifact folder to export (float or quantized)
    out: str = ""  # folder to write
    dtype: str = "fp32"  # fp16 halves the weights; meant for the CUDA provider
    optimize: bool = True  # fused ONNX Runtime contrib ops; False: standard ONNX ops only
    opset: int = DEFAULT_OPSET
    accuracy_level: int = 4  # MatMulNBits: 0 float activations, 4 int8 activations (fastest on CPU)
    ort_int8: bool = False  # baseline: ONNX Runtime's dynamic int8 quantization of the float export
    external_data: str = "auto"  # weights in model.onnx.data: auto (large models), always, never
    ort_format: bool = False  # also write model.ort for ONNX Runtime mobile / minimal builds
    atol: float = 1e-4  # float exports: largest allowed |ONNX - PyTorch| of logits and KV
    quant_rtol: float = 0.05  # quantized exports: largest allowed max|diff| / max|logits|
    threads: int | None = None  # ONNX Runtime intra-op threads during validation

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        if self.opset < MIN_OPSET:
            raise ConfigError(
                f"opset {self.opset} is too old for this decoder: LayerNormalization needs opset "
                f"{MIN_OPSET}; use --opset {MIN_OPSET} or newer"
            )
        if self.opset > 21:
            raise ConfigError(f"opset {self.opset} is newer than this exporter knows (<= 21); use --opset 17")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0..4 (MatMulNBits), got {self.accuracy_level}")
        if self.external_data not in EXTERNAL_DATA:
            raise ConfigError(f"external_data {self.external_data!r}: use one of {EXTERNAL_DATA}")
        if self.atol <= 0 or self.quant_rtol <= 0:
            raise ConfigError("atol and quant_rtol must be positive")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExportConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ExportConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
