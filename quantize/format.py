"""The quantized-weight format shared by quantization, loading and ONNX export.

A `QuantizedWeight` is one projection's integer weights: unsigned codes, one scale and one
zero point per (output row, group of input columns), and optionally `g_idx`, the group of
each input column when groups are not contiguous (GPTQ with activation order), and `offsets`,
a float added per group (llama.cpp's Q4_K grid, whose group minimum is not a whole number of
steps). Every
method (RTN, GPTQ, AWQ, SmoothQuant) produces this one structure; smoothing and AWQ scales
are already folded into the codes and the preceding LayerNorm, so a consumer needs nothing
else to run the layer.

On disk the weights use the GPTQ checkpoint layout that transformers reads (`qweight`,
`qzeros`, `scales`, `g_idx` per projection; values packed along 32-bit words, so two int4
values per byte): `gptq_tensors` writes it and `from_gptq_tensors` reads it back bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactgpt.artifacts import FLOAT_DTYPES, check_tensor
from compactgpt.errors import ArtifactError, ConfigError

SUPPORTED_BITS = (4, 8)  # storage widths: what the packing, the GPTQ layout and MatMulNBits hold


def storage_bits(bits: int) -> int:
    """The width codes of `bits` are stored and run at: 3-bit codes (Q3_K) as 4-bit codes, 5-bit
    (Q5_0) and 6-bit (Q6_K) ones as 8-bit codes -- the same values, a wider container."""
    return 4 if bits == 3 else 8 if bits in (5, 6) else bits


@dataclass
class QuantizedWeight:
    """Integer weights of one linear layer, `(out_features, in_features)` as in `nn.Linear`.

    dequantize() = (codes - zeros[:, g]) * scales[:, g] (+ offsets[:, g]), g the group of each
    input column.
    """

    bits: int  # 8 or 4
    group_size: int  # input columns per scale; == in_features: one group per output channel
    codes: torch.Tensor  # uint8 (out, in), values in [0, 2**bits)
    scales: torch.Tensor  # float32 (out, in // group_size)
    zeros: torch.Tensor  # uint8 (out, in // group_size): zero point in code units
    g_idx: torch.Tensor | None = None  # int32 (in,): group of each input column; None: j // group_size
    offsets: torch.Tensor | None = None  # float32 (out, in // group_size), added to each group; None: 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"QuantizedWeight: bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ConfigError(f"QuantizedWeight: codes must be a 2-D uint8 tensor, got {self.codes.dtype} "
                              f"{tuple(self.codes.shape)}")
        out_f, in_f = self.codes.shape
        if self.group_size <= 0 or in_f % self.group_size:
            raise ConfigError(f"QuantizedWeight: group_size={self.group_size} does not divide in_features={in_f}")
        groups = in_f // self.group_size
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != (out_f, groups):
                raise ConfigError(f"QuantizedWeight: {name} has shape {tuple(t.shape)}, expected {(out_f, groups)}")
        if self.zeros.dtype != torch.uint8:
            raise ConfigError(f"QuantizedWeight: zeros must be uint8, got {self.zeros.dtype}")
        self.scales = self.scales.to(torch.float32)
        if self.offsets is not None:
            self.offsets = self.offsets.to(torch.float32)
            if tuple(self.offsets.shape) != (out_f, groups):
                raise ConfigError(f"QuantizedWeight: offsets has shape {tuple(self.offsets.shape)}, expected "
                                  f"{(out_f, groups)}")
        if self.g_idx is not None:
            self.g_idx = self.g_idx.to(torch.int32)
            if tuple(self.g_idx.shape) != (in_f,):
                raise ConfigError(f"QuantizedWeight: g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_f},)")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def group_index(self) -> torch.Tensor:
        """int64 (in,): the group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.codes.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) = (codes - zeros[:, g]) * scales[:, g] (+ offsets[:, g])."""
        g = self.group_index()
        w = (self.codes.float() - self.zeros.float()[:, g]) * self.scales[:, g]
        return w if self.offsets is None else w + self.offsets[:, g]

    def to(self, device) -> "QuantizedWeight":
        """These weights on `device`: itself when they are there already, so a weight shared by
        the tied embedding and LM head stays one object when its modules are moved."""
        tensors = (self.codes, self.scales, self.zeros, self.g_idx, self.offsets)
        moved = tuple(None if t is None else t.to(device) for t in tensors)
        if all(a is b for a, b in zip(moved, tensors)):  # Tensor.to returns the tensor itself when it is there
            return self
        return QuantizedWeight(self.bits, self.group_size, *moved)

    def nbytes(self) -> int:
        """Bytes of the packed storage: codes at `bits` each, fp16 scales, packed zero points, fp16 offsets."""
        offsets = 0 if self.offsets is None else self.offsets.numel() * 2
        return (self.codes.numel() * self.bits + self.zeros.numel() * self.bits) // 8 + self.scales.numel() * 2 + offsets


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w on the grid (scale, zero), broadcast elementwise; returned as float: the inverse
    of `QuantizedWeight.dequantize`, which every grid (RTN, GPTQ, AWQ, the K-quants) rounds with.
    A zero step (a K-quant sub-block of zeros) gives the zero point."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, zero + 0 * w, torch.clamp(torch.round(w / safe) + zero, 0, 2**bits - 1))


# ---------------------------------------------------------------------------------------
# int4 nibble packing (the layout ONNX MatMulNBits and the GPTQ words share)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) with values < 16 -> uint8 (..., n/2); the low nibble holds the even column."""
    if codes.dtype != torch.uint8:
        raise ConfigError(f"pack_int4 takes uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ConfigError(f"pack_int4 needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ConfigError(f"pack_int4: codes must be < 16, found {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., n/2) -> uint8 (..., n)."""
    if packed.dtype != torch.uint8:
        raise ConfigError(f"unpack_int4 takes uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------
# GPTQ checkpoint layout: int32 words holding 32 // bits values, lowest bits first


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int (n, m) -> int32 (n / per, m), packing `per = 32 // bits` consecutive rows per word."""
    per = 32 // bits
    n, m = values.shape
    if n % per:
        raise ArtifactError(f"cannot pack {n} rows of {bits}-bit values into 32-bit words: {n} is not a "
                            f"multiple of {per}; the GPTQ layout needs widths divisible by {per}")
    x = values.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, device=values.device) * bits).view(1, per, 1)
    words = (x << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _pack_rows: int32 (n / per, m) -> uint8 (n, m)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, device=words.device) * bits).view(1, per, 1)
    x = (w[:, None, :] >> shifts) & ((1 << bits) - 1)
    return x.reshape(-1, words.shape[1]).to(torch.uint8)


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The GPTQ ("gptq" checkpoint format, v1) tensors of one layer.

    qweight int32 (in / per, out), qzeros int32 (groups, out / per) holding zero - 1,
    scales (groups, out) in float16 when that is exact else float32, g_idx int32 (in,); a
    weight with offsets (Q4_K) adds `offsets` (groups, out), float32 -- a CompactGPT tensor that
    GPTQ readers other than CompactGPT do not know.
    """
    mask = (1 << qw.bits) - 1
    qweight = _pack_rows(qw.codes.t(), qw.bits)
    stored_zeros = (qw.zeros.to(torch.int64) - 1) & mask  # v1 stores zero - 1
    qzeros = _pack_rows(stored_zeros, qw.bits).t().contiguous()  # (groups, out / per)
    scales = qw.scales.t().contiguous()
    if torch.equal(scales.half().float(), scales):
        scales = scales.half()
    out = {"qweight": qweight.contiguous(), "qzeros": qzeros, "scales": scales,
           "g_idx": qw.group_index().to(torch.int32).contiguous()}
    if qw.offsets is not None:
        out["offsets"] = qw.offsets.t().contiguous()
    return out


def check_gptq_header(path, name: str, entries: dict[str, tuple[str, tuple[int, ...]]], bits: int,
                      in_features: int, out_features: int) -> None:
    """Check one layer's GPTQ tensors from a safetensors header (name within the layer ->
    (dtype, shape)) before they are read: qweight and qzeros int32 words packed along rows,
    scales float16 (float32 when fp16 was not exact), g_idx int32, an optional float bias.
    Raises ArtifactError naming the tensor, what it is and what it should be."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in entries]
    if missing:
        raise ArtifactError(f"{path}: {name} lacks {missing}; the file is damaged or not GPTQ; rerun quantize")
    per = 32 // bits
    scale_shape = entries["scales"][1]
    groups = scale_shape[0] if len(scale_shape) == 2 else 0
    if groups < 1 or in_features % groups:
        raise ArtifactError(f"{path}: tensor {name}.scales has shape {tuple(scale_shape)}, which gives no whole "
                            f"number of groups over {in_features} input columns; the file is damaged; rerun quantize")
    expected = {"qweight": (("I32",), (in_features // per, out_features)),
                "qzeros": (("I32",), (groups, out_features // per)),
                "scales": (("F16", "F32"), (groups, out_features)),
                "g_idx": (("I32",), (in_features,)),
                "offsets": (("F32",), (groups, out_features)),
                "bias": (FLOAT_DTYPES, (out_features,))}
    for key, found in entries.items():
        if key not in expected:
            raise ArtifactError(f"{path}: {name}.{key} is not a GPTQ tensor (expected {sorted(expected)}); the file "
                                "is damaged or from another program; rerun quantize")
        dtypes, shape = expected[key]
        check_tensor(path, f"{name}.{key}", found, dtypes, shape,
                     f"the file is damaged or was not written for this config ({bits}-bit); rerun quantize")


def from_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int, name: str = "layer") -> QuantizedWeight:
    """Read one layer's GPTQ tensors back into a QuantizedWeight (exact inverse of gptq_tensors).
    Raises ArtifactError for missing tensors or the wrong dtypes (packed words read as floats
    would unpack to wrong codes without any error)."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise ArtifactError(f"{name}: the quantized weights lack {missing}; the file is damaged or not GPTQ")
    for key in ("qweight", "qzeros", "g_idx"):
        if key in tensors and tensors[key].dtype != torch.int32:
            raise ArtifactError(f"{name}.{key} is {tensors[key].dtype}, expected torch.int32; the file is damaged "
                                "or not GPTQ; rerun quantize")
    if "offsets" in tensors and tensors["offsets"].dtype != torch.float32:
        raise ArtifactError(f"{name}.offsets is {tensors['offsets'].dtype}, expected torch.float32; the file is "
                            "damaged; rerun quantize")
    if not tensors["scales"].is_floating_point():
        raise ArtifactError(f"{name}.scales is {tensors['scales'].dtype}, expected a float tensor; the file is "
                            "damaged or not GPTQ; rerun quantize")
    mask = (1 << bits) - 1
    codes = _unpack_rows(tensors["qweight"], bits).t().contiguous()
    zeros = ((_unpack_rows(tensors["qzeros"].t().contiguous(), bits).to(torch.int64) + 1) & mask).to(torch.uint8)
    scales = tensors["scales"].float().t().contiguous()
    out_f, in_f = codes.shape
    if zeros.shape[0] != out_f:
        raise ArtifactError(f"{name}: qzeros cover {zeros.shape[0]} outputs but qweight has {out_f}")
    zeros = zeros.contiguous()  # (out, groups)
    groups = scales.shape[1]
    if groups == 0 or in_f % groups:
        raise ArtifactError(f"{name}: {groups} scale groups do not divide {in_f} input columns")
    group_size = in_f // groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        contiguous = torch.arange(in_f, dtype=torch.int64) // group_size
        g_idx = None if torch.equal(g_idx.long(), contiguous) else g_idx.to(torch.int32)
    offsets = tensors.get("offsets")
    return QuantizedWeight(bits, group_size, codes, scales, zeros, g_idx,
                           None if offsets is None else offsets.t().contiguous())
