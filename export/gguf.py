"""GGUF files for llama.cpp: a GPT's weights and tokenizer in llama.cpp's `gpt2` architecture.

A float model is written as F32, F16 or Q8_0 (rounded here by the `gguf` package's own
quantizer). A quantized artifact is written code for code: the grids line up, so no weight is
rounded again --

    symmetric int4, zero point 8      -> Q4_0   d * (q - 8)       per 32 weights, fp16 d
    asymmetric int4                    -> Q4_1   d * q + m         per 32 weights, fp16 d and m
    symmetric int8, zero point 128     -> Q8_0   d * (q - 128)     per 32 weights, fp16 d
    symmetric 5-bit codes, zero 16     -> Q5_0   d * (q - 16)      per 32 weights, fp16 d
    6-bit codes on the Q6_K grid       -> Q6_K   d * sc * (q - 32) per 16 weights, int8 sc, fp16 d per 256
    3-bit codes on the Q3_K grid       -> Q3_K   d * sc * (q - 4)  per 16 weights, 6-bit sc, fp16 d per 256
    4-bit codes on the Q4_K grid       -> Q4_K   d * sc * q - dmin * m per 32 weights, 6-bit sc and m,
                                                 fp16 d and dmin per 256

for groups that are whole multiples of 32 columns (a group of 128 is four blocks with the same
scale). The block scale is stored in fp16: a scale that fp16 does not hold exactly moves the
weights it scales, and `write_gguf` returns the largest such change so the caller can record
it. What GGUF cannot hold code for code (activation order, groups that are not multiples of
32, int8 activations) is refused with the format that works instead.

llama.cpp reads GPT-2 from these tensor names: token_embd, position_embd, output_norm, output
(absent when the head is tied to the embedding), blk.N.{attn_norm, attn_qkv, attn_output,
ffn_norm, ffn_up, ffn_down}. ggml lists dimensions innermost first, so a torch (out, in)
matrix is stored as it is.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.tokenizer import Tokenizer
from quantize.kquant import K_SUPER, Q3_K, Q6_K, q4_k_decompose, signed_k_decompose, signed_k_kind

GGUF_FILE = "model.gguf"
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
FLOAT_TYPES = ("F32", "F16", "Q8_0")  # what a float model may be written as


@dataclass
class GGUFTensor:
    """One tensor as it goes into the file: its bytes (packed blocks for quantized types) and
    the shape of the values it holds."""

    name: str
    data: np.ndarray
    shape: tuple[int, ...]  # torch order: (rows, columns)
    ggml_type: str  # F32, F16, or a block type of BLOCK_WRITERS
    weights: torch.Tensor  # float32: the weights this tensor stands for (the artifact's, dequantized)
    decoded: torch.Tensor | None  # what the stored values must decode to exactly (None: rounded by gguf)


# ---------------------------------------------------------------------------------------
# Integer codes -> llama.cpp blocks (pure functions over one QuantizedWeight)


def _block_scales(qw) -> torch.Tensor:
    """The fp16 scale of every 32-column block, (out, in / 32): each group's scale repeated
    over the blocks the group spans."""
    return qw.scales.to(torch.float16).repeat_interleave(qw.group_size // BLOCK, dim=1)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in) codes < 16 -> (out, in / 32, 16) bytes in llama.cpp's order: byte j of a
    block holds element j in its low nibble and element j + 16 in its high nibble."""
    blocks = codes.reshape(codes.shape[0], -1, BLOCK)
    return blocks[..., :16] | (blocks[..., 16:] << 4)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's last dimension viewed as its raw little-endian bytes."""
    return t.contiguous().view(torch.uint8).reshape(*t.shape[:-1], t.shape[-1] * t.element_size())


def q4_0_blocks(qw) -> torch.Tensor:
    """Symmetric int4 codes (zero point 8) as Q4_0 blocks: (out, in / 32 * 18) bytes."""
    d = _block_scales(qw).unsqueeze(-1)  # (out, blocks, 1)
    packed = torch.cat([_as_bytes(d), _nibbles(qw.codes)], dim=-1)
    return packed.reshape(qw.out_features, -1)


def q4_1_blocks(qw) -> torch.Tensor:
    """Asymmetric int4 codes as Q4_1 blocks (d * q + m, m = -d * zero): (out, in / 32 * 20) bytes."""
    d = _block_scales(qw)
    zeros = qw.zeros.repeat_interleave(qw.group_size // BLOCK, dim=1)
    m = (-(d.float() * zeros.float())).to(torch.float16)
    packed = torch.cat([_as_bytes(d.unsqueeze(-1)), _as_bytes(m.unsqueeze(-1)), _nibbles(qw.codes)], dim=-1)
    return packed.reshape(qw.out_features, -1)


def q8_0_blocks(qw) -> torch.Tensor:
    """Symmetric int8 codes (zero point 128) as Q8_0 blocks: (out, in / 32 * 34) bytes."""
    d = _block_scales(qw).unsqueeze(-1)
    signed = (qw.codes.to(torch.int16) - 128).to(torch.int8).reshape(qw.out_features, -1, BLOCK)
    packed = torch.cat([_as_bytes(d), signed.view(torch.uint8)], dim=-1)
    return packed.reshape(qw.out_features, -1)


def q5_0_blocks(qw) -> torch.Tensor:
    """Symmetric 5-bit codes (zero point 16, stored as 8-bit codes) as Q5_0 blocks: (out, in / 32 *
    22) bytes. A block is fp16 d, 4 bytes of high bits (bit j: element j's fifth bit), and 16
    bytes whose byte j holds element j's low 4 bits in its low nibble and element j + 16's in
    its high one."""
    d = _block_scales(qw).unsqueeze(-1)
    codes = qw.codes.reshape(qw.out_features, -1, BLOCK)
    high = (codes >> 4).to(torch.int64)
    qh = (high << torch.arange(BLOCK)).sum(-1)  # bit j = element j's high bit
    qh = torch.where(qh >= 2**31, qh - 2**32, qh).to(torch.int32)  # the same 32 bits, as int32
    packed = torch.cat([_as_bytes(d), _as_bytes(qh.unsqueeze(-1)), _nibbles(codes.reshape(qw.out_features, -1) & 0x0F)],
                       dim=-1)
    return packed.reshape(qw.out_features, -1)


def q3_k_blocks(qw) -> torch.Tensor:
    """3-bit codes on the Q3_K grid (quantize.kquant, stored as 4-bit codes) as Q3_K blocks:
    (out, in / 256 * 110) bytes.

    A block is hmask[32], qs[64], 12 bytes of 6-bit scales, fp16 d. Weight j's code (0..7) keeps
    its top bit in bit j / 32 of hmask[j % 32]; its low 2 bits sit in qs: each half of 128
    weights is four runs of 32, byte l of the half's 32 holding runs 0..3 in bit pairs 0..3.
    The scales are stored as sc + 32: the low nibbles of sub-blocks 0..7 and 8..15 in bytes
    0..7 (low, high nibble), their top 2 bits in bytes 8..11 (byte 8 + j % 4, bits 2 (j / 4))."""
    d, sc = signed_k_decompose(qw.scales, Q3_K)
    out_f = qw.out_features
    supers = qw.in_features // K_SUPER
    codes = qw.codes.reshape(out_f, supers, K_SUPER)
    high = (codes >> 2).reshape(out_f, supers, 8, 32)  # (.., bit, byte)
    hmask = (high << torch.arange(8).view(8, 1)).sum(-2).to(torch.uint8)
    low = (codes & 3).reshape(out_f, supers, 2, 4, 32)  # (.., half, run, l)
    qs = (low[..., 0, :] | (low[..., 1, :] << 2) | (low[..., 2, :] << 4) | (low[..., 3, :] << 6)).reshape(
        out_f, supers, 64)
    u = (sc.to(torch.int16) + 32).to(torch.uint8).reshape(out_f, supers, 16)
    nibbles = (u[..., :8] & 0x0F) | ((u[..., 8:] & 0x0F) << 4)
    top = (u >> 4).reshape(out_f, supers, 4, 4)  # (.., j / 4, j % 4)
    tops = (top << (2 * torch.arange(4)).view(4, 1)).sum(-2).to(torch.uint8)
    packed = torch.cat([hmask, qs, nibbles, tops, _as_bytes(d.reshape(out_f, supers, 1))], dim=-1)
    return packed.reshape(out_f, -1)


def q6_k_blocks(qw) -> torch.Tensor:
    """6-bit codes on the Q6_K grid (quantize.kquant) as Q6_K blocks: (out, in / 256 * 210) bytes.

    A block is ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales, fp16 d. Each half
    of 128 weights is four runs of 32: byte l of the half's ql holds run 0 in its low nibble
    and run 2 in its high one, byte 32 + l runs 1 and 3; byte l of its qh holds the high bits
    of runs 0..3 in bit pairs 0..3."""
    d, sc = signed_k_decompose(qw.scales, Q6_K)
    out_f = qw.out_features
    q = qw.codes.reshape(out_f, -1, 2, 4, 32)  # (out, super-blocks, half, run, l)
    low, high = q & 0x0F, q >> 4
    ql = torch.cat([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], dim=-1)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    supers = q.shape[1]
    packed = torch.cat([ql.reshape(out_f, supers, 128), qh.reshape(out_f, supers, 64),
                        sc.reshape(out_f, supers, 16).view(torch.uint8), _as_bytes(d.unsqueeze(-1))], dim=-1)
    return packed.reshape(out_f, -1)


def q4_k_blocks(qw) -> torch.Tensor:
    """4-bit codes on the Q4_K grid (quantize.kquant) as Q4_K blocks: (out, in / 256 * 144) bytes.

    A block is fp16 d and dmin, 12 bytes of 6-bit sub-block scales and mins, and 128 bytes of
    codes: each run of 64 weights is 32 bytes, weight l in the low nibble of byte l, weight
    32 + l in its high nibble. Scales and mins 0..3 fill the low 6 bits of bytes 0..3 and 4..7;
    those of 4..7 keep their low 4 bits in bytes 8..11 and their top 2 in the top bits of 0..7."""
    d, sc, dmin, m = q4_k_decompose(qw)
    out_f = qw.out_features
    supers = qw.in_features // 256
    sc, m = sc.reshape(out_f, supers, 8), m.reshape(out_f, supers, 8)
    packed_scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                               (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)], dim=-1)
    q = qw.codes.reshape(out_f, supers, 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(out_f, supers, 128)
    packed = torch.cat([_as_bytes(d.reshape(out_f, supers, 1)), _as_bytes(dmin.reshape(out_f, supers, 1)),
                        packed_scales, qs], dim=-1)
    return packed.reshape(out_f, -1)


def block_type(qw, name: str) -> str:
    """The GGUF type that holds `qw` code for code; ConfigError naming the nearest format that
    works when there is none."""
    if qw.g_idx is not None:
        raise ConfigError(f"{name}: activation-order groups (g_idx) have no GGUF equivalent; quantize "
                          "without --act-order to export GGUF, or export ONNX")
    kind = signed_k_kind(qw)
    if kind is not None and signed_k_decompose(qw.scales, kind) is not None:
        return kind.name
    if qw.offsets is not None:
        if q4_k_decompose(qw) is None:
            raise ConfigError(f"{name}: group offsets that are not llama.cpp's Q4_K grid have no GGUF equivalent; "
                              "quantize with --grid k (or full) to export GGUF")
        return "Q4_K"
    if qw.group_size % BLOCK:
        raise ConfigError(f"{name}: group size {qw.group_size} is not a multiple of {BLOCK}, the GGUF block; "
                          "quantize with --group-size 32, 64 or 128 (or 0, per channel) to export GGUF")
    zeros = torch.unique(qw.zeros)
    if qw.bits == 8:
        if zeros.tolist() == [16] and int(qw.codes.max()) < 32:
            return "Q5_0"
        if zeros.tolist() != [128]:
            raise ConfigError(f"{name}: asymmetric int8 has no GGUF equivalent (Q8_0 is symmetric); quantize "
                              "with --symmetric to export GGUF")
        return "Q8_0"
    return "Q4_0" if zeros.tolist() == [8] else "Q4_1"


BLOCK_WRITERS = {"Q4_0": q4_0_blocks, "Q4_1": q4_1_blocks, "Q5_0": q5_0_blocks, "Q8_0": q8_0_blocks,
                 "Q3_K": q3_k_blocks, "Q4_K": q4_k_blocks, "Q6_K": q6_k_blocks}


def gguf_dequantized(qw, ggml_type: str | None = None) -> torch.Tensor:
    """The float32 weights the GGUF blocks of `qw` decode to: the artifact's own weights with
    each scale (and Q4_1 min) rounded to fp16, as llama.cpp computes them. ggml_type: its
    `block_type` when the caller has it (finding a K-quant's super-block factors is not free)."""
    ggml_type = ggml_type or block_type(qw, "weight")
    if ggml_type in ("Q3_K", "Q4_K", "Q6_K"):  # steps d * sc and offsets -dmin * m are exact, as llama.cpp computes them
        return qw.dequantize()
    d = qw.scales.to(torch.float16).float()[:, qw.group_index()]
    zeros = qw.zeros.float()[:, qw.group_index()]
    if ggml_type == "Q4_1":
        m = (-(d * zeros)).to(torch.float16).float()
        return d * qw.codes.float() + m
    return d * (qw.codes.float() - zeros)


# ---------------------------------------------------------------------------------------
# A model -> named tensors


def _float_tensor(name: str, t: torch.Tensor, ggml_type: str) -> GGUFTensor:
    """A float tensor as F32 / F16, or rounded to Q8_0 by the gguf package's quantizer."""
    weights = t.detach().float().cpu()
    values = weights.numpy()
    if ggml_type == "F16":
        return GGUFTensor(name, values.astype(np.float16), tuple(values.shape), "F16", weights, weights.half().float())
    if ggml_type == "Q8_0" and values.ndim == 2 and values.shape[1] % BLOCK == 0:
        from gguf import GGMLQuantizationType, quants

        blocks = quants.quantize(values, GGMLQuantizationType.Q8_0)
        return GGUFTensor(name, blocks, tuple(values.shape), "Q8_0", weights, None)
    return GGUFTensor(name, values, tuple(values.shape), "F32", weights, weights)


def _matrix(name: str, module, float_type: str, rows: int | None = None) -> GGUFTensor:
    """A projection or embedding matrix: its codes as blocks when quantized, else a float tensor;
    `rows` keeps only the first rows (the tokenizer's vocabulary of a padded embedding)."""
    qw = getattr(module, "qweight", None)
    if qw is None:
        return _float_tensor(name, module.weight[:rows], float_type)
    if getattr(module, "act_bits", None) is not None:
        raise ConfigError(f"{name}: int8 activations (SmoothQuant) have no GGUF equivalent; export the weights "
                          "with --method rtn or gptq --bits 8 to export GGUF, or export ONNX")
    ggml_type = block_type(qw, name)
    blocks = BLOCK_WRITERS[ggml_type](qw)[:rows]
    return GGUFTensor(name, blocks.numpy(), (blocks.shape[0], qw.in_features), ggml_type,
                      module.weight[:rows].detach().float().cpu(), gguf_dequantized(qw, ggml_type)[:rows].cpu())


def _vector(name: str, t: torch.Tensor) -> GGUFTensor:
    """LayerNorm gains and biases stay float32, as llama.cpp's converter keeps them."""
    weights = t.detach().float().cpu()
    return GGUFTensor(name, weights.numpy(), tuple(weights.shape), "F32", weights, weights)


def _projection(name: str, linear, float_type: str) -> list[GGUFTensor]:
    """A projection's weight and float32 bias."""
    return [_matrix(f"{name}.weight", linear, float_type), _vector(f"{name}.bias", linear.bias)]


def gguf_tensors(model: GPT, n_vocab: int, float_type: str = "F32") -> list[GGUFTensor]:
    """Every tensor of `model` under llama.cpp's GPT-2 names. The embedding keeps its first
    `n_vocab` rows: llama.cpp sizes the vocabulary from the tokenizer, and the rows past it
    (vocabulary padding) are never predicted. Position table and norms stay float32."""
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"GGUF type {float_type!r} is not one of {FLOAT_TYPES}")
    t = model.transformer
    out = [_matrix("token_embd.weight", t.wte, float_type, rows=n_vocab),
           _float_tensor("position_embd.weight", t.wpe.weight, "F32")]
    for i, block in enumerate(t.h):
        p = f"blk.{i}"
        out += [_vector(f"{p}.attn_norm.weight", block.ln_1.weight), _vector(f"{p}.attn_norm.bias", block.ln_1.bias),
                *_projection(f"{p}.attn_qkv", block.attn.c_attn, float_type),
                *_projection(f"{p}.attn_output", block.attn.c_proj, float_type),
                _vector(f"{p}.ffn_norm.weight", block.ln_2.weight), _vector(f"{p}.ffn_norm.bias", block.ln_2.bias),
                *_projection(f"{p}.ffn_up", block.mlp.c_fc, float_type),
                *_projection(f"{p}.ffn_down", block.mlp.c_proj, float_type)]
    out += [_vector("output_norm.weight", t.ln_f.weight), _vector("output_norm.bias", t.ln_f.bias)]
    # No `output` tensor: the head is tied to the embedding (one copy, quantized or not), which
    # llama.cpp reads as the head when `output` is absent.
    return out


# ---------------------------------------------------------------------------------------
# The file


def tokenizer_metadata(writer, tokenizer: Tokenizer) -> None:
    """GPT-2 byte-level BPE as llama.cpp reads it: every token string by id, the merges in rank
    order, the `gpt-2` pre-tokenizer and <|endoftext|> as begin, end and unknown token."""
    import json

    from gguf import TokenType

    spec = json.loads(tokenizer.to_json())
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * tokenizer.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_unk_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)


def write_gguf(path: str | Path, model: GPT, tokenizer: Tokenizer, float_type: str = "F32",
               name: str = "compactgpt") -> list[GGUFTensor]:
    """Write `model` (float or quantized) and its tokenizer to one GGUF file at `path`; returns
    the tensors written. ConfigError for what llama.cpp's GPT-2 cannot compute as CompactGPT does
    (the exact-erf GELU) and for weights GGUF cannot hold code for code."""
    from gguf import GGMLQuantizationType, GGUFWriter

    c = model.config
    if c.activation_function != "gelu_new":
        raise ConfigError(f"llama.cpp's GPT-2 computes the tanh GELU; this model uses {c.activation_function!r}: "
                          "export it to ONNX instead")
    tensors = gguf_tensors(model, tokenizer.vocab_size, float_type)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(str(partial), "gpt2")
    writer.add_name(name)
    writer.add_context_length(c.n_positions)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(c.n_inner)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)
    tokenizer_metadata(writer, tokenizer)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape,
                          raw_dtype=GGMLQuantizationType[t.ggml_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return tensors


def read_gguf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32 by the gguf package's own
    dequantizers, in torch order (rows, columns): what llama.cpp computes with."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
    return out


def verify_gguf(path: str | Path, written: list[GGUFTensor]) -> dict:
    """Read the file back with the gguf package and check every tensor: the stored bytes are the
    ones written (codes bit for bit) and decode, with gguf's own dequantizers, to exactly the
    values they must; returns the largest change from the artifact's weights per GGUF type (fp16
    scales, F16 rounding, Q8_0 of a float model). Raises ExportError for any mismatch."""
    from gguf import GGUFReader, quants

    from .errors import ExportError

    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    if sorted(stored) != sorted(t.name for t in written):
        raise ExportError(f"{path} holds tensors {sorted(set(stored) ^ {t.name for t in written})} it should not "
                          "(or lacks them); export again")
    change: dict[str, float] = {}
    for t in written:
        raw = stored[t.name]
        if raw.tensor_type.name != t.ggml_type or not np.array_equal(np.asarray(raw.data).reshape(t.data.shape), t.data):
            raise ExportError(f"{path}: {t.name} does not hold the {t.ggml_type} values written; export again")
        decoded = torch.from_numpy(np.array(quants.dequantize(raw.data, raw.tensor_type), np.float32).reshape(t.shape))
        if t.decoded is not None and not torch.equal(decoded, t.decoded):
            raise ExportError(f"{path}: {t.name} decodes to other weights than the artifact's in llama.cpp's "
                              f"{t.ggml_type} grid; export again")
        diff = float((decoded - t.weights).abs().max()) if decoded.numel() else 0.0
        change[t.ggml_type] = max(change.get(t.ggml_type, 0.0), diff)
    return {"tensors": len(written), "codes_equal": True, "max_weight_change": change}


def export_gguf(config, log=print) -> Path:
    """The export stage with --format gguf: config.model (a float model or a quantized artifact)
    -> config.out/model.gguf with config.json and the tokenizer beside it, read back and checked
    (`verify_gguf`) before the folder is complete. Raises ConfigError for what GGUF cannot hold
    (with the format that works) and for an --out that claim_output refuses."""
    from compactgpt.artifacts import begin_write, finish_write, implied_parameters

    from .source import TOKENIZER_FILES, claimed_export, load_source

    with claimed_export(config) as (src, out):
        model, tokenizer, quantized = load_source(src, "gguf")
        out = begin_write(out, "export")
        written = write_gguf(out / GGUF_FILE, model, tokenizer, config.gguf_type.upper(), name=src.name)
        check = verify_gguf(out / GGUF_FILE, written)
        shutil.copyfile(src / "config.json", out / "config.json")
        tokenizer.save(out)
        size = (out / GGUF_FILE).stat().st_size
        types: dict[str, int] = {}
        for t in written:
            types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
        metrics = {"gguf_bytes": size, "bits_per_parameter": 8 * size / implied_parameters(model.config),
                   "max_weight_change": check["max_weight_change"]}
        finish_write(out, "export", config.to_dict(), parent=src, metrics=metrics,
                     files=[GGUF_FILE, "config.json", *TOKENIZER_FILES],
                     extra={"kind": "gguf", "quantized": quantized, "tensor_types": types, "verify": check})
    log(f"wrote {out}: {GGUF_FILE} ({', '.join(f'{n} {k}' for k, n in sorted(types.items()))}), "
        f"{metrics['bits_per_parameter']:.2f} bits/param, read back equal to the artifact's weights")
    return out
