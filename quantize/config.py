"""One config dataclass per quantization method, validated on creation, and the registry
that finds a method's config by its name.

Every config serializes to a flat dict (`to_dict`; `versioned_dict` adds the format version,
saved in the artifact's manifest and config.json) and back (`config_from_dict`, which refuses
settings written by a newer version), and every field is one CLI flag whose help text lives
on the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from compactgpt.calibration import (calib_samples_option, calib_seed_option, calib_seq_len_option,
                                    check_calibration)
from compactgpt.config import VERSION_KEY, StageConfig, option
from compactgpt.errors import ConfigError

from .format import storage_bits
from .kquant import SIGNED_K

# name -> config class, in registration order (the order of the CLI's flags); filled by
# @register_method below.
METHODS: dict[str, type["QuantConfig"]] = {}
GRIDS = ("full", "midpoint", "k")


def register_method(name: str):
    """Class decorator: register a config class under a method name (`--method NAME`)."""

    def wrap(cls):
        cls.method = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass
class QuantConfig(StageConfig):
    """Settings shared by every method."""

    method: ClassVar[str] = ""
    config_version: ClassVar[int] = 2  # 2: `grid` (symmetric grids use every code by default)
    supported_bits: ClassVar[tuple[int, ...]] = (4, 8)
    calibrated: ClassVar[bool] = False  # needs calibration data (prepare -> calibrate -> convert)
    integer_weights: ClassVar[bool] = True  # produces QuantizedWeight (GPTQ layout); False for bitsandbytes
    # Bits one layer may take beyond supported_bits (--head-bits, --bits-per-weight's mix), each
    # a llama.cpp format: 3 = Q3_K, 5 = Q5_0 (symmetric groups of 32), 6 = Q6_K.
    extra_bits: ClassVar[tuple[int, ...]] = ()
    k_grid: ClassVar[bool] = False  # solves on llama.cpp's Q4_K grid (--grid k)

    bits: int = option(8, "bits per weight")
    group_size: int = option(0, "input columns that share one scale (must divide every quantized layer's "
                                "width; 0 = one scale per output channel)")
    symmetric: bool = option(True, "symmetric codes (zero point fixed at the middle code) instead of an "
                                   "asymmetric zero point per group")
    include_embeddings: bool = option(False, "also quantize the tied token embedding / LM head (a large share "
                                             "of a small model)")
    # llama.cpp's Q4_K_M keeps its output matrix at 6 bits for the same reason: every logit comes
    # from it, and it is a large share of a small model's error.
    head_bits: int = option(0, added=True, help="bits of the tied embedding / LM head with --include-embeddings "
                            "(0 = --bits; 8 beside 4-bit blocks keeps the matrix every logit comes from at int8; 6 "
                            "(rtn, gptq, awq): llama.cpp's Q6_K grid, 6.56 bits per weight, needs a width that is a "
                            "multiple of 256; 5 (rtn, gptq, awq): symmetric 5-bit groups as llama.cpp's Q5_0, 5.5 "
                            "bits per weight with --group-size 32)")
    # Artifacts saved before `grid` existed (config_version 1) were made on the midpoint grid:
    # `from_dict` reads their settings so; settings without a version (a pipeline config, the
    # Python API) are current ones.
    grid: str = option("full", help="integer grid: full (symmetric codes use every code, the group's signed extreme "
                       "on the end code as llama.cpp's Q4_0 puts it, int8 at max|w|/127 as Q8_0, each group's step "
                       "searched on its squared error, asymmetric groups' too), midpoint (the earlier symmetric "
                       "grid: step 2 max|w| / (2**bits - 1), one code unused) or k (rtn, gptq, 4 bits: llama.cpp's "
                       "Q4_K, a searched step and minimum per 32 columns as 6-bit multiples of fp16 numbers per 256; "
                       "4.5 bits per weight; the embedding / LM head, and layers at other bits, stay on the full "
                       "grid)")
    # Chosen by --bits-per-weight (quantize.mix) and saved, so the loader reads each layer at its
    # width (GPTQModel's per-module overrides, `dynamic` in config.json, say the same).
    module_bits: dict = option(default_factory=dict, flag=False, added=True,
                               help="bits of single layers (GPT-wide name or lm_head -> 4, 6 or 8), overriding "
                                    "--bits and --head-bits; set by --bits-per-weight")
    # llama.cpp stores each block's numbers in fp16. Scales are always rounded up to fp16, which
    # covers Q4_0 and Q8_0; Q4_1 also stores scale x zero point (its min), which fp16 rounds
    # unless the scale was chosen for it.
    gguf_exact: bool = option(False, added=True, help="for artifacts meant for llama.cpp: asymmetric int4 groups widen "
                              "their step until float16 holds both the step and the group minimum (step x zero point), "
                              "as GGUF's Q4_1 stores them, so the GGUF export holds exactly the evaluated weights "
                              "(+0.3 percent weight error). Symmetric grids (Q4_0, Q8_0) are always fp16-exact")

    def validate(self) -> None:
        if self.bits not in self.supported_bits:
            raise ConfigError(
                f"{self.method}: bits={self.bits} is not supported; this method quantizes to "
                f"{' or '.join(map(str, self.supported_bits))} bits"
            )
        if self.group_size < 0:
            raise ConfigError(f"{self.method}: group_size must be 0 (per channel) or positive, got {self.group_size}")
        if self.group_size and self.group_size % 2:
            raise ConfigError(f"{self.method}: group_size={self.group_size} must be even (int4 packs two per byte)")
        head_choices = sorted({*self.supported_bits, *self.extra_bits})
        if self.head_bits and self.head_bits not in head_choices:
            raise ConfigError(f"{self.method}: head_bits={self.head_bits} is not supported; use 0 (= bits) or "
                              f"{' or '.join(map(str, head_choices))}")
        if self.gguf_exact and not self.integer_weights:
            raise ConfigError(f"{self.method}: gguf_exact sets how integer grids are chosen; bitsandbytes keeps its "
                              "own scales; drop --gguf-exact")
        for name, bits in self.module_bits.items():
            if bits not in head_choices:
                raise ConfigError(f"{self.method}: module_bits gives {name} {bits} bits; this method quantizes to "
                                  f"{' or '.join(map(str, head_choices))}")
        if self.grid not in GRIDS:
            raise ConfigError(f"{self.method}: grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.grid == "k":
            if not self.k_grid:
                raise ConfigError(f"{self.method}: the k grid (Q4_K) is made by rtn and gptq; use --grid full")
            if self.bits != 4 or self.group_size not in (0, 32):
                raise ConfigError(f"{self.method}: the k grid is llama.cpp's Q4_K: 4 bits in groups of 32; use "
                                  "--bits 4 --group-size 32")

        if self.head_bits and not self.include_embeddings:
            raise ConfigError(f"{self.method}: head_bits sets the bits of the quantized embedding / LM head; add "
                              "--include-embeddings, or drop --head-bits")

    def to_dict(self) -> dict:
        return {"method": self.method, **super().to_dict()}

    @property
    def full(self) -> bool:
        """Whether symmetric grids use every code (`quantize.rtn.grid_params`): all but midpoint."""
        return self.grid != "midpoint"

    @classmethod
    def from_dict(cls, values: dict, where: str = "", **fixed: Any):
        values = dict(values)
        version = values.get(VERSION_KEY)
        if isinstance(version, int) and version < 2 and "grid" not in values and "grid" not in fixed:
            values["grid"] = "midpoint"  # what version 1 computed
        return super().from_dict(values, where, **fixed)

    def bits_for(self, name: str) -> int:
        """The bits of one quantized layer: head_bits for the LM head when set, else bits."""
        if name in self.module_bits:
            return self.module_bits[name]
        return self.head_bits if name == "lm_head" and self.head_bits else self.bits

    def grid_for(self, name: str) -> str:
        """The grid of one layer: the k grid (Q4_K) holds only the blocks' 4-bit layers; a layer at
        other bits is on the full grid (Q3_K / Q6_K for 3 / 6 bits, Q5_0's rule for 5, Q8_0's for 8)."""
        if self.grid == "k" and (name == "lm_head" or self.bits_for(name) != 4):
            return "full"
        return self.grid

    def stored_bits_for(self, name: str) -> int:
        """The storage width of one layer's codes (`quantize.format.storage_bits`)."""
        return storage_bits(self.bits_for(name))

    def symmetric_for(self, name: str) -> bool:
        """Whether one layer's codes are symmetric: llama.cpp's Q3_K, Q5_0 and Q6_K always are."""
        return self.symmetric or self.bits_for(name) in self.extra_bits

    def group_for(self, in_features: int, name: str = "layer") -> int:
        """The group size used for a layer of this width; errors when it does not divide it."""
        bits = self.bits_for(name)
        if bits in SIGNED_K:
            return SIGNED_K[bits].group  # Q3_K's / Q6_K's sub-blocks, whatever --group-size says
        if self.grid == "k" and name != "lm_head":
            return 32  # Q4_K's sub-blocks, and Q8_0's blocks for a layer the mix gives 8 bits
        if self.group_size == 0:
            return in_features
        if in_features % self.group_size:
            raise ConfigError(
                f"{self.method}: group_size={self.group_size} does not divide the {in_features} input "
                f"columns of {name}; choose a group size that divides every layer's width "
                "(e.g. 32, 64 or 128 for widths that are multiples of 128), or 0 for per-channel"
            )
        return self.group_size


def _default(name: str, value: Any) -> Any:
    """A method's own default for a shared field, keeping the field's help text."""
    return field(default=value, metadata=QuantConfig.__dataclass_fields__[name].metadata)


@dataclass
class CalibratedConfig(QuantConfig):
    calibrated: ClassVar[bool] = True

    # The calibration set as prune and sparsify declare it (compactgpt.calibration).
    calib_samples: int = calib_samples_option(128)
    calib_seq_len: int = calib_seq_len_option()
    seed: int = calib_seed_option()

    def validate(self) -> None:
        super().validate()
        check_calibration(self.calib_samples, self.calib_seq_len, f"{self.method}: ")


@register_method("rtn")
@dataclass
class RTNConfig(QuantConfig):
    """Round to nearest: per output channel (group_size 0) or per group of input columns."""

    extra_bits: ClassVar[tuple[int, ...]] = (3, 5, 6)
    k_grid: ClassVar[bool] = True


@register_method("gptq")
@dataclass
class GPTQConfig(CalibratedConfig):
    """GPTQ: each column's rounding error is compensated on the columns not yet quantized,
    weighted by the inverse Hessian of the layer's calibration inputs."""

    extra_bits: ClassVar[tuple[int, ...]] = (3, 5, 6)
    k_grid: ClassVar[bool] = True

    bits: int = _default("bits", 4)
    group_size: int = _default("group_size", 128)
    damp_percent: float = option(0.01, "GPTQ: Hessian dampening, as a share of its mean diagonal")
    bits_per_weight: float = option(0.0, added=True, help="GPTQ: mixed precision under this budget of bits per "
                                    "weight over the quantized matrices (scales included, as GGUF stores them: Q3_K "
                                    "3.4375, 4-bit 4.5, Q5_0 5.5, Q6_K 6.5625, Q8_0 8.5): each matrix's format is "
                                    "chosen from its measured effect on the KL from the float model (0 = every "
                                    "matrix at --bits)")
    act_order: bool = option(True, "GPTQ: quantize columns in order of decreasing activation energy")
    block_columns: int = option(128, "GPTQ: columns updated together in one lazy batch")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"gptq: damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_columns <= 0:
            raise ConfigError(f"gptq: block_columns must be positive, got {self.block_columns}")
        if self.bits_per_weight and not 3.4375 <= self.bits_per_weight <= 8.5:
            raise ConfigError(f"gptq: bits_per_weight must be 0 (off) or from 3.4375 (all Q3_K) to 8.5 (all Q8_0), "
                              f"got {self.bits_per_weight}")
        if self.bits_per_weight and (self.bits != 4 or self.group_size not in (0, 32)):
            raise ConfigError("gptq: --bits-per-weight mixes 4-bit groups of 32 with Q3_K, Q5_0, Q6_K and Q8_0; use "
                              "--bits 4 --group-size 32")


@register_method("awq")
@dataclass
class AWQConfig(CalibratedConfig):
    """AWQ: per-input-channel scales that protect the channels with large activations, searched
    on calibration data and folded into the preceding LayerNorm or projection; then a search
    for the clipping range of every group."""

    extra_bits: ClassVar[tuple[int, ...]] = (5, 6)

    bits: int = _default("bits", 4)
    group_size: int = _default("group_size", 128)
    symmetric: bool = _default("symmetric", False)
    n_grid: int = option(20, "AWQ: points on the grid searched for the scale exponent and the clipping ratio")
    max_shrink: float = option(0.5, "AWQ: smallest clipping ratio tried is 1 - max-shrink (0 = no clipping "
                                    "search)")
    duo_scaling: bool = option(True, "AWQ: scales from activation and weight magnitudes (mean|x|^a / "
                                     "mean|w|^(1-a)) instead of activations alone")

    def validate(self) -> None:
        super().validate()
        if self.n_grid < 1:
            raise ConfigError(f"awq: n_grid must be >= 1, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"awq: max_shrink must be in [0, 1), got {self.max_shrink}")


@register_method("smoothquant")
@dataclass
class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant W8A8: activation outliers migrated into the weights by per-channel scales
    folded into the LayerNorms; int8 per-channel weights; int8 per-token dynamic activations."""

    supported_bits: ClassVar[tuple[int, ...]] = (8,)
    alpha: float = option(0.5, "SmoothQuant: migration strength (0 = all difficulty on activations, 1 = all "
                               "on weights)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")


@register_method("bnb-int8")
@dataclass
class BnbInt8Config(QuantConfig):
    """bitsandbytes LLM.int8 (Linear8bitLt): int8 row-wise weights, outlier features in float."""

    supported_bits: ClassVar[tuple[int, ...]] = (8,)
    integer_weights: ClassVar[bool] = False
    threshold: float = option(6.0, "LLM.int8: activation magnitude above which a feature runs in float "
                                   "(0 = pure int8)")

    def validate(self) -> None:
        super().validate()
        if self.group_size:
            raise ConfigError("bnb-int8: LLM.int8 quantizes per output row; group_size must be 0")
        if self.threshold < 0:
            raise ConfigError(f"bnb-int8: threshold must be >= 0, got {self.threshold}")


@register_method("bnb-nf4")
@dataclass
class BnbNF4Config(QuantConfig):
    """bitsandbytes 4-bit (Linear4bit): NF4 or FP4 codes with one absmax per block."""

    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    integer_weights: ClassVar[bool] = False
    bits: int = _default("bits", 4)
    quant_type: str = option("nf4", "bitsandbytes 4-bit data type: nf4 or fp4")
    blocksize: int = option(64, "bitsandbytes 4-bit: weights per absmax block")
    double_quant: bool = option(False, "bitsandbytes 4-bit: quantize the absmax statistics too")

    def validate(self) -> None:
        super().validate()
        if self.group_size:
            raise ConfigError("bnb-nf4: bitsandbytes sets its block with --blocksize; group_size must be 0")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"bnb-nf4: quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"bnb-nf4: blocksize must be a power of two from 32 to 4096, got {self.blocksize}")


def _method_class(method: str) -> type[QuantConfig]:
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def config_for(method: str, **settings) -> QuantConfig:
    """Build a method's config by name; unknown methods and unknown settings are errors."""
    return _method_class(method).from_dict(settings, where=method)


def config_from_dict(d: dict) -> QuantConfig:
    """Inverse of QuantConfig.to_dict / versioned_dict. Settings without a `config_version`
    read as version 1; a version newer than this code's is refused (ConfigError)."""
    d = dict(d)
    if "method" not in d:
        raise ConfigError(f"quantization settings {d} name no method")
    method = d.pop("method")
    return _method_class(method).from_dict(d, where=f"{method} quantization settings")


__all__ = ["METHODS", "VERSION_KEY", "QuantConfig", "CalibratedConfig", "RTNConfig", "GPTQConfig", "AWQConfig",
           "SmoothQuantConfig", "BnbInt8Config", "BnbNF4Config", "register_method", "config_for",
           "config_from_dict"]
