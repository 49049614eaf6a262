"""Build the decoder graph directly from the weights (no tracing).

Writing the graph node by node, as ONNX Runtime's GenAI model builder does, means every
projection is a MatMul (never a Gemm that 4-bit quantizers skip), names are fixed by the
spec, and quantized weights become MatMulNBits nodes straight from their integer codes.

Two forms of the same math:

* fused (default): ONNX Runtime contrib ops. SkipLayerNormalization adds the residual, the
  projection bias and normalizes in one op; FastGelu adds the MLP bias and applies tanh-GELU;
  MultiHeadAttention takes q/k/v with their bias, the past KV and an additive mask and returns
  the present KV.
* unfused: standard ONNX ops only (LayerNormalization, MatMul, Softmax, ...), for runtimes
  other than ONNX Runtime.

Both compute an additive attention bias (B, 1, T, P+T) once from attention_mask and the
causal structure, as `compactgpt.model.attention_bias` does, so left padding works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compactgpt.model import GPT

from .errors import ExportError
from .nbits import NBitsWeight, to_nbits
from .spec import DEFAULT_OPSET, IR_VERSION, MS_DOMAIN, DecoderSpec

_NP = {"fp32": np.float32, "fp16": np.float16}
_ONNX = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


@dataclass
class Projection:
    """One linear layer as the graph needs it: float (in, out) weight, or MatMulNBits arrays."""

    name: str
    bias: np.ndarray | None
    weight: np.ndarray | None = None  # float (in, out)
    nbits: NBitsWeight | None = None
    act_bits: int | None = None


def projection_of(name: str, module: torch.nn.Module) -> Projection:
    """A Linear or a quantized module from quantize/ (duck-typed on `.qweight`)."""
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().cpu().numpy()
    q = getattr(module, "qweight", None)
    if q is not None:
        g_idx = None if q.g_idx is None else q.g_idx.cpu().numpy()
        try:
            nb = to_nbits(q.codes.cpu().numpy(), q.scales.float().cpu().numpy(), q.zeros.cpu().numpy(),
                          q.bits, q.group_size, g_idx)
        except ExportError as e:
            raise ExportError(f"{name}: {e}") from e
        return Projection(name, bias, nbits=nb, act_bits=getattr(module, "act_bits", None))
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ExportError(
            f"{name} is a {type(module).__name__}, which the exporter does not know: expected an "
            "nn.Linear or a quantized linear exposing .qweight"
        )
    return Projection(name, bias, weight=weight.detach().float().cpu().numpy().T.copy())


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, dtype: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dtype = dtype
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, array: np.ndarray, cast: bool = True) -> str:
        if cast and array.dtype in (np.float32, np.float64):
            array = array.astype(_NP[self.dtype])
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, hint: str, values, dtype) -> str:
        return self.init(self.fresh(hint), np.asarray(values, dtype=dtype), cast=False)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           outputs: list[str] | None = None, domain: str | None = None, **attrs) -> list[str]:
        name = name or self.fresh(op_type)
        outputs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def one(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]


def _dynamic_int8_inits(g: _Graph, p: Projection) -> list[str]:
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
    # uint8 codes c with zero point z are the signed codes c - 128 with zero point z - 128: the same
    # weights, in the type the faster kernels read.
    signed = lambda a: (a.astype(np.int16) - 128).astype(np.int8)  # noqa: E731
    codes = nb.packed.reshape(nb.n, nb.k)
    return [g.init(p.name + ".qweight", np.ascontiguousarray(signed(codes).T), cast=False),
            g.init(p.name + ".scales", scales[:, 0].copy()), g.init(p.name + ".qzeros", signed(zeros[:, 0]), cast=False)]


def _dynamic_int8(g: _Graph, x: str, p: Projection, inits: list[str], with_bias: bool) -> str:
    """x @ W with ONNX Runtime's DynamicQuantizeMatMul: activations quantized to uint8 per tensor
    at run time, weights from `_dynamic_int8_inits`."""
    ins = [x, *inits]
    if with_bias and p.bias is not None:
        ins.append(g.init(p.name + ".bias", p.bias))
    return g.one("DynamicQuantizeMatMul", ins, domain=MS_DOMAIN, name=p.name)


def _int8_lookup(g: _Graph, inits: list[str], ids: str) -> str:
    """Embedding rows (B, T, C) read from the LM head's DynamicQuantizeMatMul codes (C, V): the
    token's column, (code - zero point) * scale, as PyTorch's dequantized table holds it, so the
    tied matrix is in the file once."""
    codes, scales, zeros = inits
    column = g.one("Cast", [g.one("Gather", [codes, ids], axis=1)], to=TensorProto.FLOAT)  # (C, B, T)
    zero = g.one("Cast", [g.one("Gather", [zeros, ids], axis=0)], to=TensorProto.FLOAT)  # (B, T)
    rows = g.one("Mul", [g.one("Sub", [column, zero]), g.one("Gather", [scales, ids], axis=0)])
    return g.one("Transpose", [rows], perm=[1, 2, 0], name="transformer.wte")


def _quantized_lookup(g: _Graph, nb: NBitsWeight, inits: list[str], ids: str) -> str:
    """Embedding rows (B, T, C) gathered from the LM head's own MatMulNBits codes, scales and
    zero points, dequantized on the fly (GatherBlockQuantized): the tied matrix is in the file
    once. MatMulNBits keeps its codes as (V, blocks, bytes per block) and GatherBlockQuantized
    reads (V, bytes per row): the Reshapes only relabel the same bytes."""
    i64 = np.int64
    codes, scales, zeros = inits
    n_blocks = nb.k // nb.block_size
    data = g.one("Reshape", [codes, g.const("wte_codes_shape", [nb.n, -1], i64)])
    scales = g.one("Reshape", [scales, g.const("wte_scales_shape", [nb.n, n_blocks], i64)])
    zeros = g.one("Reshape", [zeros, g.const("wte_zeros_shape", [nb.n, -1], i64)])
    return g.one("GatherBlockQuantized", [data, ids, scales, zeros], name="transformer.wte", domain=MS_DOMAIN,
                 gather_axis=0, quantize_axis=1, block_size=nb.block_size, bits=nb.bits)


@dataclass
class BuildOptions:
    """How build_decoder lays out the graph (ExportConfig's dtype, optimize, opset and
    accuracy_level), the LayerNorm epsilon and metadata written into the model."""

    dtype: str = "fp32"
    fused: bool = True
    opset: int = DEFAULT_OPSET
    accuracy_level: int = 4
    int8_kernel: str = "matmulnbits"  # or "dynamic": DynamicQuantizeMatMul for per-channel int8 blocks
    eps: float = 1e-5
    extra_meta: dict = field(default_factory=dict)
    # The tokenizer's size when the embedding has padding rows past it (None: every row is a
    # token): the graph masks those logits so no runtime's argmax or sampling can pick them.
    n_tokens: int | None = None


def build_decoder(model: GPT, projections: dict[str, Projection], options: BuildOptions) -> onnx.ModelProto:
    """The decoder ModelProto of `model`, with `projections` (see `collect_projections`)."""
    cfg = model.config
    spec = DecoderSpec.from_config(cfg)
    g = _Graph(options.dtype)
    fdt = _ONNX[options.dtype]
    C, nh, hs = cfg.n_embd, cfg.n_head, cfg.head_dim
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    # A quantized embedding keeps its (dequantized) table as a non-persistent buffer.
    sd["transformer.wte.weight"] = model.transformer.wte.weight.detach().float().cpu().numpy()
    eps = cfg.layer_norm_epsilon

    quantized: dict[str, list[str]] = {}  # projection name -> its MatMulNBits initializers

    def nbits_inits(p: Projection) -> list[str]:
        """(codes, scales, zero points) of a quantized projection, stored once however many
        nodes read them (the LM head's also serve the embedding lookup)."""
        if p.name not in quantized:
            nb = p.nbits
            quantized[p.name] = [g.init(p.name + ".qweight", nb.packed),
                                 g.init(p.name + ".scales", nb.scales.astype(_NP[options.dtype])),
                                 g.init(p.name + ".qzeros", nb.zero_points)]
        return quantized[p.name]

    dynamic: dict[str, list[str]] = {}  # projection name -> its DynamicQuantizeMatMul initializers

    def on_dynamic_int8(p: Projection | None) -> bool:
        return p is not None and p.nbits is not None and p.nbits.bits == 8 and options.int8_kernel == "dynamic"

    def dynamic_inits(p: Projection) -> list[str]:
        """(codes, scales, zero points) of a DynamicQuantizeMatMul projection, stored once (the
        LM head's also serve the embedding lookup)."""
        if p.name not in dynamic:
            dynamic[p.name] = _dynamic_int8_inits(g, p)
        return dynamic[p.name]

    def matmul(x: str, p: Projection, with_bias: bool) -> str:
        """x @ W (+ bias when with_bias; otherwise the caller folds the bias into a fused op)."""
        if on_dynamic_int8(p):
            return _dynamic_int8(g, x, p, dynamic_inits(p), with_bias)
        if p.nbits is not None:
            nb = p.nbits
            if nb.order is not None:
                x = g.one("Gather", [x, g.const(p.name + ".order", nb.order, np.int64)], axis=-1)
            ins = [x, *nbits_inits(p)]
            if with_bias and p.bias is not None:
                ins += ["", g.init(p.name + ".bias", p.bias)]
            # SmoothQuant's W8A8 layers were calibrated for int8 activations: level 4 is their
            # arithmetic whatever the weight-only layers use.
            level = 4 if p.act_bits == 8 else options.accuracy_level
            return g.one("MatMulNBits", ins, domain=MS_DOMAIN, name=p.name, K=nb.k, N=nb.n, bits=nb.bits,
                         block_size=nb.block_size, accuracy_level=level)
        y = g.one("MatMul", [x, g.init(p.name + ".weight", p.weight)], name=p.name)
        if with_bias and p.bias is not None:
            y = g.one("Add", [y, g.init(p.name + ".bias", p.bias)])
        return y

    def bias_of(p: Projection) -> str:
        b = p.bias if p.bias is not None else np.zeros(p.nbits.n if p.nbits else p.weight.shape[1], np.float32)
        return g.init(p.name + ".bias", b)

    def layer_norm(x: str, prefix: str) -> str:
        return g.one("LayerNormalization", [x, g.init(prefix + ".weight", sd[prefix + ".weight"]),
                                            g.init(prefix + ".bias", sd[prefix + ".bias"])], axis=-1, epsilon=eps)

    def skip_ln(x: str, skip: str, prefix: str, bias: str | None) -> tuple[str, str]:
        """(LayerNorm(x + skip + bias), x + skip + bias)."""
        if options.fused:
            ins = [x, skip, g.init(prefix + ".weight", sd[prefix + ".weight"]),
                   g.init(prefix + ".bias", sd[prefix + ".bias"])] + ([bias] if bias else [])
            name = g.fresh("SkipLayerNorm")
            out = g.op("SkipLayerNormalization", ins, name=name, domain=MS_DOMAIN, epsilon=eps,
                       outputs=[f"{name}/out", "", "", f"{name}/sum"])
            return out[0], out[3]
        s = g.one("Add", [x, bias]) if bias else x
        s = g.one("Add", [s, skip])
        return layer_norm(s, prefix), s

    # -- inputs / outputs -----------------------------------------------------------------
    shapes_in, shapes_out = spec.input_shapes(), spec.output_shapes()
    inputs = [
        helper.make_tensor_value_info(spec.input_ids, TensorProto.INT64, shapes_in[spec.input_ids]),
        helper.make_tensor_value_info(spec.attention_mask, TensorProto.INT64, shapes_in[spec.attention_mask]),
        helper.make_tensor_value_info(spec.position_ids, TensorProto.INT64, shapes_in[spec.position_ids]),
    ] + [helper.make_tensor_value_info(n, fdt, shapes_in[n]) for n in spec.past_names]
    outputs = [helper.make_tensor_value_info(spec.logits, fdt, shapes_out[spec.logits])] + [
        helper.make_tensor_value_info(n, fdt, shapes_out[n]) for n in spec.present_names]

    # -- attention bias (B, 1, T, P+T), shared by every layer ---------------------------------
    i64 = np.int64
    past_len = g.one("Shape", [spec.past_key(0)], start=2, end=3)
    new_len = g.one("Shape", [spec.input_ids], start=1, end=2)
    total = g.one("Add", [past_len, new_len])
    axis0 = g.const("axis0", [0], i64)
    p_s, t_s = g.one("Squeeze", [past_len, axis0]), g.one("Squeeze", [total, axis0])
    zero, one = g.const("zero", 0, i64), g.const("one", 1, i64)
    q_pos = g.one("Unsqueeze", [g.one("Range", [p_s, t_s, one]), g.const("axis1", [1], i64)])  # (T, 1)
    k_pos = g.one("Unsqueeze", [g.one("Range", [zero, t_s, one]), axis0])  # (1, P+T)
    causal = g.one("LessOrEqual", [k_pos, q_pos])  # (T, P+T)
    mask = g.one("Cast", [spec.attention_mask], to=TensorProto.BOOL)
    mask = g.one("Unsqueeze", [mask, g.const("axes12", [1, 2], i64)])  # (B, 1, 1, P+T)
    allowed = g.one("And", [causal, mask])  # (B, 1, T, P+T)
    np_dt = _NP[options.dtype]
    attn_bias = g.one("Where", [allowed, g.const("zero_f", np.zeros((), np_dt), np_dt),
                                g.const("min_f", np.array(np.finfo(np_dt).min, np_dt), np_dt)], name="attention_bias")

    # -- embeddings: the tied matrix is stored once, as the LM head's (C, V) or its codes -----
    head = projections.get("lm_head")
    wte_t = None
    if head is None or head.nbits is None:
        wte_t = g.init("transformer.wte.weight_t", sd["transformer.wte.weight"].T.copy())
        tok = g.one("Gather", [wte_t, spec.input_ids], axis=1)  # (C, B, T)
        tok = g.one("Transpose", [tok], perm=[1, 2, 0])  # (B, T, C)
    elif on_dynamic_int8(head):
        tok = _int8_lookup(g, dynamic_inits(head), spec.input_ids)
    elif head.nbits.order is None:
        tok = _quantized_lookup(g, head.nbits, nbits_inits(head), spec.input_ids)
    else:  # activation-ordered codes have permuted columns: the lookup keeps a float table
        tok = g.one("Gather", [g.init("transformer.wte.weight", sd["transformer.wte.weight"]), spec.input_ids], axis=0)
    wpe = sd["transformer.wpe.weight"]
    if options.dtype == "fp32" and np.array_equal(wpe.astype(np.float16).astype(np.float32), wpe):
        # A table of float16 numbers (quantized embeddings round it so): stored in float16,
        # rows cast after the lookup, the same values at half the bytes.
        pos = g.one("Gather", [g.init("transformer.wpe.weight", wpe.astype(np.float16), cast=False), spec.position_ids],
                    axis=0)
        pos = g.one("Cast", [pos], to=TensorProto.FLOAT)
    else:
        pos = g.one("Gather", [g.init("transformer.wpe.weight", wpe), spec.position_ids], axis=0)

    scale = 1.0 / math.sqrt(hs)
    # x: normalized input of the current sublayer; resid: the residual stream it adds to.
    x, resid = skip_ln(tok, pos, "transformer.h.0.ln_1", None)
    if not options.fused:
        shape_bthd = g.const("shape_bthd", [0, 0, nh, hs], i64)
        shape_btc = g.const("shape_btc", [0, 0, C], i64)
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}"
        c_attn, c_proj = projections[f"{pre}.attn.c_attn"], projections[f"{pre}.attn.c_proj"]
        c_fc, m_proj = projections[f"{pre}.mlp.c_fc"], projections[f"{pre}.mlp.c_proj"]
        # ---- attention
        if options.fused:
            qkv = matmul(x, c_attn, with_bias=False)
            q, k, v = g.op("Split", [qkv, g.const("split", [C, C, C], i64)], n_out=3, axis=-1)
            attn = g.op("MultiHeadAttention", [q, k, v, bias_of(c_attn), "", attn_bias, spec.past_key(i), spec.past_value(i)],
                        name=f"{pre}.attn", domain=MS_DOMAIN, num_heads=nh, scale=scale,
                        outputs=[f"{pre}.attn/out", spec.present_key(i), spec.present_value(i)])[0]
        else:
            qkv = matmul(x, c_attn, with_bias=True)
            q, k, v = g.op("Split", [qkv, g.const("split", [C, C, C], i64)], n_out=3, axis=-1)
            heads = lambda t: g.one("Transpose", [g.one("Reshape", [t, shape_bthd])], perm=[0, 2, 1, 3])
            q, k, v = heads(q), heads(k), heads(v)  # (B, nh, T, hs)
            k = g.op("Concat", [spec.past_key(i), k], axis=2, outputs=[spec.present_key(i)])[0]
            v = g.op("Concat", [spec.past_value(i), v], axis=2, outputs=[spec.present_value(i)])[0]
            scores = g.one("MatMul", [q, g.one("Transpose", [k], perm=[0, 1, 3, 2])])
            scores = g.one("Mul", [scores, g.const("scale", np.array(scale, np_dt), np_dt)])
            probs = g.one("Softmax", [g.one("Add", [scores, attn_bias])], axis=-1)
            y = g.one("Transpose", [g.one("MatMul", [probs, v])], perm=[0, 2, 1, 3])
            attn = g.one("Reshape", [y, shape_btc])
        a = matmul(attn, c_proj, with_bias=not options.fused)
        x, resid = skip_ln(a, resid, f"{pre}.ln_2", bias_of(c_proj) if options.fused else None)
        # ---- MLP
        h = matmul(x, c_fc, with_bias=not options.fused)
        h = _gelu(g, h, bias_of(c_fc) if options.fused else None, cfg.activation_function, options.fused, np_dt)
        m = matmul(h, m_proj, with_bias=not options.fused)
        nxt = f"transformer.h.{i + 1}.ln_1" if i + 1 < cfg.n_layer else "transformer.ln_f"
        x, resid = skip_ln(m, resid, nxt, bias_of(m_proj) if options.fused else None)

    # Embedding rows past the tokenizer (None: every row is a token).
    padding = (np.arange(cfg.vocab_size) >= options.n_tokens
               if options.n_tokens is not None and options.n_tokens < cfg.vocab_size else None)
    # The padding mask as a quantized head's bias: float32 logits are far smaller than half an
    # ulp of the lowest float32 (2^103), so logit + lowest rounds to lowest exactly, as the Where
    # below gives, and the head's kernel adds it for free (a Where over V logits cost 74 us of a
    # 6.2 ms int4 124M step on one thread). float16's lowest (-65504) has an ulp of 32: it keeps
    # the Where.
    mask_in_head = padding is not None and head is not None and head.nbits is not None and options.dtype == "fp32"
    if head is not None and head.nbits is not None:
        if mask_in_head:
            lowest = np.where(padding, np.finfo(np.float32).min, 0)
            bias = (lowest if head.bias is None else lowest + head.bias).astype(np.float32)
            head = Projection(head.name, bias, nbits=head.nbits, act_bits=head.act_bits)
        matmul(x, head, with_bias=True)
    else:
        g.one("MatMul", [x, wte_t], name="lm_head")  # (B, T, V)
    if padding is not None and not mask_in_head:
        # Padding rows: replaced (not offset) by the dtype's lowest value, as PyTorch's
        # mask_padded_vocab does, so parity holds exactly there and nothing is ever -inf/NaN.
        lowest = g.const("vocab_padding_value", np.array(np.finfo(np_dt).min, np_dt), np_dt)
        g.op("Where", [g.const("vocab_padding", padding, np.bool_), lowest, g.nodes[-1].output[0]], name="vocab_mask",
             outputs=[spec.logits])
    else:
        g.nodes[-1].output[0] = spec.logits  # the head's own output is the graph's logits

    graph = helper.make_graph(g.nodes, "compactgpt_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", options.opset)]
    if any(n.domain == MS_DOMAIN for n in g.nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model_proto = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                    producer_name="compactgpt")
    for k, v in options.extra_meta.items():
        model_proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    return model_proto


def _gelu(g: _Graph, h: str, bias: str | None, kind: str, fused: bool, np_dt) -> str:
    tanh_form = kind in ("gelu_new", "gelu_pytorch_tanh")
    if fused:
        if tanh_form:
            return g.one("FastGelu", [h, bias], domain=MS_DOMAIN)
        return g.one("BiasGelu", [h, bias], domain=MS_DOMAIN)
    c = lambda v: g.const("c", np.array(v, np_dt), np_dt)
    if tanh_form:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.one("Mul", [g.one("Mul", [h, h]), h])
        inner = g.one("Add", [h, g.one("Mul", [cube, c(0.044715)])])
        t = g.one("Tanh", [g.one("Mul", [inner, c(math.sqrt(2.0 / math.pi))])])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = g.one("Erf", [g.one("Mul", [h, c(1.0 / math.sqrt(2.0))])])
    return g.one("Mul", [g.one("Mul", [h, c(0.5)]), g.one("Add", [t, c(1.0)])])


def exact_arithmetic(projections: dict[str, Projection], accuracy_level: int) -> bool:
    """True when ONNX Runtime computes what PyTorch computes up to float rounding: float
    weights, or weight-only integer weights with float activations (accuracy level 0)."""
    quantized = [p for p in projections.values() if p.nbits is not None]
    return all(p.act_bits is None for p in quantized) and (accuracy_level == 0 or not quantized)


def collect_projections(model: GPT) -> dict[str, Projection]:
    """Every projection of the GPT (and a quantized LM head when there is one), by module name."""
    out = {}
    for i in range(model.config.n_layer):
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            name = f"transformer.h.{i}.{sub}"
            out[name] = projection_of(name, model.get_submodule(name))
    if getattr(model.lm_head, "qweight", None) is not None:
        out["lm_head"] = projection_of("lm_head", model.lm_head)
    return out
