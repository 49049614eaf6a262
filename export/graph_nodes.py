"""The node-level pieces of the decoder graph that `export.graph.DecoderBuilder` writes: a
node and initializer collector with unique names, the projection record, and the subgraphs
that read integer weights (ONNX Runtime's DynamicQuantizeMatMul, embedding lookups from the
LM head's codes) or apply GELU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .nbits import NBitsWeight
from .spec import MS_DOMAIN

# Float element types of the graph, by ExportConfig.dtype.
NUMPY_TYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


@dataclass
class Projection:
    """One linear layer as the graph needs it: float (in, out) weight, or MatMulNBits arrays."""

    name: str
    bias: np.ndarray | None
    weight: np.ndarray | None = None  # float (in, out)
    nbits: NBitsWeight | None = None
    act_bits: int | None = None


class OnnxGraph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, dtype: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dtype = dtype
        self._n = 0

    def fresh(self, hint: str) -> str:
        """A name not used before: the hint and a counter."""
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, array: np.ndarray, cast: bool = True) -> str:
        """Add an initializer (float arrays cast to the graph's dtype unless cast=False); its name."""
        if cast and array.dtype in (np.float32, np.float64):
            array = array.astype(NUMPY_TYPES[self.dtype])
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, hint: str, values, dtype) -> str:
        """An initializer of `values` in `dtype` under a fresh name."""
        return self.init(self.fresh(hint), np.asarray(values, dtype=dtype), cast=False)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           outputs: list[str] | None = None, domain: str | None = None, **attrs) -> list[str]:
        """Add one node; its output names (`outputs`, or named after the node)."""
        name = name or self.fresh(op_type)
        outputs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def one(self, op_type: str, inputs: list[str], **kw) -> str:
        """Add a node with one output; that output's name."""
        return self.op(op_type, inputs, **kw)[0]


def dynamic_int8_inits(g: OnnxGraph, p: Projection) -> list[str]:
    """(codes (K, N) int8, scales (N,), zero points (N,) int8) of a per-channel int8 projection as
    ONNX Runtime's DynamicQuantizeMatMul reads them: signed codes for its u8s8 kernels (VNNI where
    the CPU has it). Raises ExportError for int8 weights that are not per channel."""
    nb = p.nbits
    n_blocks = nb.k // nb.block_size
    scales, zeros = nb.scales.reshape(nb.n, n_blocks), nb.zero_points.reshape(nb.n, n_blocks)
    if nb.order is not None or not ((scales == scales[:, :1]).all() and (zeros == zeros[:, :1]).all()):
        raise ExportError(f"{p.name}: --int8-kernel dynamic needs per-channel int8 weights (one scale per output "
                          "row, no activation order); quantize with --group-size 0, or export with "
                          "--int8-kernel matmulnbits")
    codes = nb.packed.reshape(nb.n, nb.k)
    return [g.init(p.name + ".qweight", np.ascontiguousarray(_signed(codes).T), cast=False),
            g.init(p.name + ".scales", scales[:, 0].copy()),
            g.init(p.name + ".qzeros", _signed(zeros[:, 0]), cast=False)]


def _signed(codes: np.ndarray) -> np.ndarray:
    """uint8 codes c (or zero points z) as the signed c - 128: with z - 128 the same weights, in
    the type the faster kernels read."""
    return (codes.astype(np.int16) - 128).astype(np.int8)


def dynamic_int8_matmul(g: OnnxGraph, x: str, p: Projection, inits: list[str], with_bias: bool,
                        outputs: list[str] | None = None) -> str:
    """x @ W with ONNX Runtime's DynamicQuantizeMatMul: activations quantized to uint8 per tensor
    at run time, weights from `dynamic_int8_inits`."""
    ins = [x, *inits]
    if with_bias and p.bias is not None:
        ins.append(g.init(p.name + ".bias", p.bias))
    return g.one("DynamicQuantizeMatMul", ins, domain=MS_DOMAIN, name=p.name, outputs=outputs)


def int8_lookup(g: OnnxGraph, inits: list[str], ids: str) -> str:
    """Embedding rows (B, T, C) read from the LM head's DynamicQuantizeMatMul codes (C, V): the
    token's column, (code - zero point) * scale, as PyTorch's dequantized table holds it, so the
    tied matrix is in the file once."""
    codes, scales, zeros = inits
    column = g.one("Cast", [g.one("Gather", [codes, ids], axis=1)], to=TensorProto.FLOAT)  # (C, B, T)
    zero = g.one("Cast", [g.one("Gather", [zeros, ids], axis=0)], to=TensorProto.FLOAT)  # (B, T)
    rows = g.one("Mul", [g.one("Sub", [column, zero]), g.one("Gather", [scales, ids], axis=0)])
    return g.one("Transpose", [rows], perm=[1, 2, 0], name="transformer.wte")


def nbits_lookup(g: OnnxGraph, nb: NBitsWeight, inits: list[str], ids: str) -> str:
    """Embedding rows (B, T, C) gathered from the LM head's own MatMulNBits codes, scales and
    zero points, dequantized on the fly (GatherBlockQuantized): the tied matrix is in the file
    once. MatMulNBits keeps its codes as (V, blocks, bytes per block) and GatherBlockQuantized
    reads (V, bytes per row): the Reshapes only relabel the same bytes."""
    i64 = np.int64
    codes, scales, *zeros = inits  # no zero points: the middle code, as for MatMulNBits
    n_blocks = nb.k // nb.block_size
    data = g.one("Reshape", [codes, g.const("wte_codes_shape", [nb.n, -1], i64)])
    scales = g.one("Reshape", [scales, g.const("wte_scales_shape", [nb.n, n_blocks], i64)])
    zeros = [g.one("Reshape", [z, g.const("wte_zeros_shape", [nb.n, -1], i64)]) for z in zeros]
    return g.one("GatherBlockQuantized", [data, ids, scales, *zeros], name="transformer.wte", domain=MS_DOMAIN,
                 gather_axis=0, quantize_axis=1, block_size=nb.block_size, bits=nb.bits)


def gelu(g: OnnxGraph, h: str, bias: str | None, kind: str, fused: bool) -> str:
    """GELU of h (+ bias, which the fused ops add themselves): the tanh form for GPT-2's
    gelu_new / gelu_pytorch_tanh, else the exact erf form."""
    tanh_form = kind in ("gelu_new", "gelu_pytorch_tanh")
    if fused:
        return g.one("FastGelu" if tanh_form else "BiasGelu", [h, bias], domain=MS_DOMAIN)
    np_dt = NUMPY_TYPES[g.dtype]

    def c(v):
        return g.const("c", np.array(v, np_dt), np_dt)

    if tanh_form:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.one("Mul", [g.one("Mul", [h, h]), h])
        inner = g.one("Add", [h, g.one("Mul", [cube, c(0.044715)])])
        t = g.one("Tanh", [g.one("Mul", [inner, c(math.sqrt(2.0 / math.pi))])])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = g.one("Erf", [g.one("Mul", [h, c(1.0 / math.sqrt(2.0))])])
    return g.one("Mul", [g.one("Mul", [h, c(0.5)]), g.one("Add", [t, c(1.0)])])
