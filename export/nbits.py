"""Pure functions that lay quantize/'s integer weights out as ONNX Runtime's MatMulNBits wants.

MatMulNBits(A, B, scales, zero_points[, g_idx]) computes A @ dequant(B)^T with B stored per
output row in blocks of `block_size` input columns: 4-bit codes two to a byte (low nibble =
even column), 8-bit codes one to a byte, one scale and one zero point per block. The codes,
scales and zero points from quantize/ are carried over unchanged; only their layout changes:

* a group wider than ONNX Runtime's block (per-channel int8, groups of 512, ...) is split into
  several blocks that repeat the group's scale and zero point (exactly the same dequantization);
* GPTQ's activation order (g_idx) is turned into contiguous groups by permuting the input
  columns of the weight, and the graph gathers the activations in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ExportError

# Block lengths the CPU kernels of MatMulNBits implement.
BLOCK_SIZES = (16, 32, 64, 128, 256)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 (..., n) with values < 16 -> uint8 (..., ceil(n/2)); low nibble = even column.

    An odd n is padded with a zero nibble."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) > 15:
        raise ExportError(f"4-bit codes must be < 16, found {int(codes.max())}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of pack_nibbles: uint8 (..., ceil(n/2)) -> uint8 (..., n)."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :n]


def block_size_for(group_size: int, in_features: int) -> int:
    """The largest MatMulNBits block length that tiles a group exactly.

    Raises ExportError when no supported block divides the group (groups narrower than 16
    columns or of an odd width)."""
    for bs in sorted(BLOCK_SIZES, reverse=True):
        if group_size % bs == 0 and in_features % bs == 0:
            return bs
    raise ExportError(
        f"group size {group_size} (in_features {in_features}) cannot be laid out as MatMulNBits "
        f"blocks of {BLOCK_SIZES}: quantize with a group size that is a multiple of 16"
    )


def contiguous_order(g_idx: np.ndarray | None, group_size: int, in_features: int) -> np.ndarray | None:
    """A column permutation that makes the groups of g_idx contiguous, or None when they are.

    Raises ExportError when g_idx does not give every group exactly group_size columns."""
    if g_idx is None:
        return None
    g_idx = np.asarray(g_idx, dtype=np.int64)
    natural = np.arange(in_features) // group_size
    if g_idx.shape != (in_features,):
        raise ExportError(f"g_idx has shape {g_idx.shape}, expected ({in_features},)")
    if np.array_equal(g_idx, natural):
        return None
    order = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[order], natural):
        raise ExportError(
            "g_idx does not assign exactly group_size columns to every group; this weight cannot "
            "be expressed as contiguous MatMulNBits blocks"
        )
    return order


@dataclass
class NBitsWeight:
    """Arrays and attributes of one MatMulNBits node."""

    bits: int
    block_size: int
    n: int  # output features
    k: int  # input features
    packed: np.ndarray  # uint8 (N, n_blocks, block_size * bits / 8)
    scales: np.ndarray  # float32 (N * n_blocks,)
    zero_points: np.ndarray  # uint8 (N * ceil(n_blocks * bits / 8),); float32 (N * n_blocks,) with offsets
    order: np.ndarray | None  # int64 (K,): gather activations in this order first

    @property
    def default_zero_points(self) -> bool:
        """Whether every zero point is the middle code, MatMulNBits' (and GatherBlockQuantized's)
        default when the input is left out: symmetric codes need none stored."""
        if self.zero_points.dtype != np.uint8:
            return False
        n_blocks = self.k // self.block_size
        zeros = self.zero_points.reshape(self.n, -1)
        if self.bits == 4:
            zeros = unpack_nibbles(zeros, n_blocks)
        return bool(np.all(zeros == 1 << (self.bits - 1)))


def to_nbits(codes, scales, zeros, bits: int, group_size: int, g_idx=None, offsets=None) -> NBitsWeight:
    """quantize/'s (codes, scales, zeros[, g_idx][, offsets]) -> MatMulNBits arrays, same dequantization.

    codes uint8 (N, K); scales float32 (N, K // group_size); zeros uint8 (N, K // group_size);
    offsets float32 (N, K // group_size) or None. MatMulNBits takes float zero points: a group
    offset o becomes the zero point zero - o / scale ((q - zp) * scale = (q - zero) * scale + o,
    to float32 rounding; the steps of the Q4_K grid are never 0).
    """
    codes = np.asarray(codes, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.float32)
    zeros = np.asarray(zeros, dtype=np.uint8)
    if bits not in (4, 8):
        raise ExportError(f"MatMulNBits holds 4- or 8-bit weights, got {bits} bits")
    n, k = codes.shape
    if k % group_size:
        raise ExportError(f"in_features {k} is not a multiple of group_size {group_size}")
    n_groups = k // group_size
    if scales.shape != (n, n_groups) or zeros.shape != (n, n_groups):
        raise ExportError(
            f"scales {scales.shape} / zeros {zeros.shape} do not match codes {codes.shape} with "
            f"group_size {group_size}; expected ({n}, {n_groups})"
        )
    order = contiguous_order(None if g_idx is None else np.asarray(g_idx), group_size, k)
    if order is not None:
        codes = codes[:, order]
    bs = block_size_for(group_size, k)
    repeat = group_size // bs
    n_blocks = k // bs
    scales_b = np.repeat(scales, repeat, axis=1)  # (N, n_blocks)
    packed = pack_nibbles(codes).reshape(n, n_blocks, bs // 2) if bits == 4 else codes.reshape(n, n_blocks, bs)
    if offsets is not None:
        offsets = np.asarray(offsets, dtype=np.float32)
        if offsets.shape != (n, n_groups) or not np.all(scales != 0):
            raise ExportError(f"offsets {offsets.shape} need shape ({n}, {n_groups}) and nonzero scales")
        zp = np.repeat(zeros.astype(np.float32) - offsets / scales, repeat, axis=1)  # float, one per block
    else:
        zeros_b = np.repeat(zeros, repeat, axis=1)
        zp = pack_nibbles(zeros_b) if bits == 4 else zeros_b  # (N, ceil(n_blocks / 2)) for 4 bits
    return NBitsWeight(bits, bs, n, k, np.ascontiguousarray(packed), scales_b.reshape(-1).copy(),
                       np.ascontiguousarray(zp).reshape(-1), order)


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 (N, K) from MatMulNBits arrays, in the original column order (for tests)."""
    n_blocks = w.k // w.block_size
    codes = unpack_nibbles(w.packed.reshape(w.n, -1), w.k) if w.bits == 4 else w.packed.reshape(w.n, w.k)
    if w.bits == 4 and w.zero_points.dtype == np.uint8:  # packed two to a byte; float zero points are not
        zeros = unpack_nibbles(w.zero_points.reshape(w.n, -1), n_blocks)
    else:
        zeros = w.zero_points.reshape(w.n, n_blocks)
    scales = w.scales.reshape(w.n, n_blocks)
    per_col = lambda a: np.repeat(a, w.block_size, axis=1)
    out = (codes.astype(np.float32) - per_col(zeros).astype(np.float32)) * per_col(scales)
    if w.order is not None:
        restored = np.empty_like(out)
        restored[:, w.order] = out
        out = restored
    return out


def dequantize_linear_graph(proto):
    """A copy of an onnx.ModelProto whose MatMulNBits nodes are written as standard ops:
    DequantizeLinear of the same 4-/8-bit codes (blocked along the input axis, opset 21) ->
    Transpose -> MatMul (-> Add for a bias); a GatherBlockQuantized lookup that reads a rewritten
    head's codes (the tied embedding) becomes a Gather of the same dequantized matrix. The file
    stays as small as the MatMulNBits graph, and a runtime may fold each DequantizeLinear into a
    float weight when it loads the graph (ONNX Runtime does with the session option
    session.disable_quant_qdq=1), trading memory for float kernels where it has no fast
    MatMulNBits kernel (WebAssembly). The result is MatMulNBits at accuracy_level 0 (float
    activations). Returns (proto, MatMulNBits nodes rewritten); the default-domain opset becomes
    21 only when a node was rewritten.

    Raises ExportError for a MatMulNBits this rewrite does not express (g_idx input, a block
    size that does not divide K)."""
    import copy

    from onnx import helper, numpy_helper

    proto = copy.deepcopy(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    # Scales stored in float16 reach MatMulNBits through a Cast to the graph's float type.
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in inits}
    dequantized: dict[str, str] = {}  # MatMulNBits codes initializer -> its (N, K) float weight
    prologue, nodes, added = [], [], []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        weight, dq_nodes, tensors = _dequantize_node(node, inits, casts, numpy_helper, helper)
        added += tensors
        prologue += dq_nodes  # first: the embedding lookup, early in the graph, may read it
        dequantized[node.input[1]] = weight
        base = node.name or node.input[1]
        inputs = list(node.input) + [""] * (6 - len(node.input))
        bias = inputs[5]
        nodes.append(helper.make_node("Transpose", [weight], [weight + "_t"], name=f"{base}.transpose", perm=[1, 0]))
        product = node.output[0] if not bias else f"{base}.dq_product"
        nodes.append(helper.make_node("MatMul", [inputs[0], weight + "_t"], [product], name=base))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{base}.bias"))
    if not dequantized:
        return proto, 0
    reshaped = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Reshape"}
    for i, node in enumerate(nodes):
        codes = reshaped.get(node.input[0]) if node.op_type == "GatherBlockQuantized" else None
        if codes in dequantized:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("gather_axis", 0) == 0 and attrs.get("quantize_axis", 1) == 1:
                nodes[i] = helper.make_node("Gather", [dequantized[codes], node.input[1]], list(node.output),
                                            name=node.name, axis=0)
    set_nodes(graph, prologue + nodes, added)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)  # blocked DequantizeLinear and 4-bit types
    proto.ir_version = max(proto.ir_version, 10)
    return proto, len(dequantized)


def _dequantize_node(node, inits: dict, casts: dict, numpy_helper, helper):
    """(name of the (N, K) float weight, its nodes (DequantizeLinear, after a Cast of float16
    scales), the initializers they read) for one MatMulNBits node; `casts` maps a Cast's output
    to the initializer it casts (float16 scales cast to float32)."""
    import onnx

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inputs = list(node.input) + [""] * (6 - len(node.input))
    qweight, scales, qzeros, g_idx = inputs[1:5]
    if g_idx or k % bs or bits not in (4, 8):
        raise ExportError(f"MatMulNBits {node.name} ({bits} bits, K={k}, block {bs}"
                          f"{', g_idx' if g_idx else ''}) cannot be written as DequantizeLinear")
    n_blocks = k // bs
    packed = numpy_helper.to_array(inits[qweight]).reshape(n, -1)
    codes = unpack_nibbles(packed, k) if bits == 4 else packed[:, :k]
    if qzeros and numpy_helper.to_array(inits[qzeros]).dtype != np.uint8:
        raise ExportError(f"MatMulNBits {node.name} has float zero points (llama.cpp's Q4_K grid, --grid k), which "
                          "DequantizeLinear cannot hold; quantize with --grid full for this target")
    if qzeros:
        z = numpy_helper.to_array(inits[qzeros]).reshape(n, -1)
        zeros = unpack_nibbles(z, n_blocks) if bits == 4 else z[:, :n_blocks]
    else:  # MatMulNBits' default zero point: the middle of the code range
        zeros = np.full((n, n_blocks), 1 << (bits - 1), np.uint8)
    cast = scales in casts  # float16 scales, cast to the graph's float32 after dequantizing
    scale = numpy_helper.to_array(inits[casts.get(scales, scales)]).reshape(n, n_blocks)

    def codes_tensor(name: str, values: np.ndarray, signed: bool):
        if bits == 8:
            return numpy_helper.from_array(np.ascontiguousarray(values, np.int8 if signed else np.uint8), name)
        # ONNX stores 4-bit tensors two to a byte, low nibble first, in row-major order.
        nibbles = (values.astype(np.int16) & 0x0F).astype(np.uint8)
        return helper.make_tensor(name, onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4,
                                  list(values.shape), pack_nibbles(nibbles.reshape(-1)).tobytes(), raw=True)

    base = node.name or qweight
    weight = f"{base}.dq_weight"
    # Symmetric codes (every zero point the middle code): signed codes with no zero point, as small
    # as the MatMulNBits codes; otherwise unsigned codes and their zero points.
    symmetric = bool(np.all(zeros == 1 << (bits - 1)))
    if symmetric:
        tensors = [codes_tensor(f"{base}.dq_codes", codes.astype(np.int16) - (1 << (bits - 1)), True)]
        inputs = [f"{base}.dq_codes", f"{base}.dq_scales"]
    else:
        tensors = [codes_tensor(f"{base}.dq_codes", codes, False), codes_tensor(f"{base}.dq_zeros", zeros, False)]
        inputs = [f"{base}.dq_codes", f"{base}.dq_scales", f"{base}.dq_zeros"]
    dq = [helper.make_node("DequantizeLinear", inputs, [weight], name=f"{base}.dequantize", axis=1, block_size=bs)]
    if cast:  # the float16 scales stay float16 in the file; the product is taken in float32
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}.dq_scales_fp16"))
        dq.insert(0, helper.make_node("Cast", [f"{base}.dq_scales_fp16"], [f"{base}.dq_scales"],
                                      name=f"{base}.dq_scales_cast", to=onnx.TensorProto.FLOAT))
    else:
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}.dq_scales"))
    return weight, dq, tensors


def set_nodes(graph, nodes: list, added: list) -> None:
    """Make `nodes` the graph's nodes, keeping only those its outputs depend on and only the
    initializers (old or `added`) they read: what a rewrite leaves unread is not written."""
    nodes = live_nodes(nodes, {o.name for o in graph.output})
    used = {i for node in nodes for i in node.input}
    kept = [t for t in list(graph.initializer) + list(added) if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def live_nodes(nodes: list, outputs: set[str]) -> list:
    """The nodes some graph output depends on, in their order (drops what a rewrite left unread)."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]
