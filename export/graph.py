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

`DecoderBuilder` writes the graph one part at a time (inputs and outputs, attention bias,
embeddings, blocks, LM head); each graph output is named by the node that makes it. The
node-level pieces (`OnnxGraph`, the integer weight kernels and lookups) are in
`export.graph_nodes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from compactgpt.model import GPT

from .errors import ExportError
from .graph_nodes import (NUMPY_TYPES, ONNX_TYPES, OnnxGraph, Projection, dynamic_int8_inits, dynamic_int8_matmul,
                          gelu, int8_lookup, nbits_lookup)
from .nbits import to_nbits
from .spec import DEFAULT_OPSET, IR_VERSION, MS_DOMAIN, DecoderSpec


def projection_of(name: str, module: torch.nn.Module) -> Projection:
    """A Linear or a quantized module from quantize/ (duck-typed on `.qweight`)."""
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().cpu().numpy()
    q = getattr(module, "qweight", None)
    if q is not None:
        g_idx = None if q.g_idx is None else q.g_idx.cpu().numpy()
        try:
            nb = to_nbits(q.codes.cpu().numpy(), q.scales.float().cpu().numpy(), q.zeros.cpu().numpy(),
                          q.bits, q.group_size, g_idx, None if q.offsets is None else q.offsets.cpu().numpy())
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


@dataclass
class BuildOptions:
    """How build_decoder lays out the graph (ExportConfig's dtype, optimize, opset and
    accuracy_level) and metadata written into the model."""

    dtype: str = "fp32"
    fused: bool = True
    opset: int = DEFAULT_OPSET
    accuracy_level: int = 4
    int8_kernel: str = "matmulnbits"  # or "dynamic": DynamicQuantizeMatMul for per-channel int8 blocks
    extra_meta: dict = field(default_factory=dict)
    # The tokenizer's size when the embedding has padding rows past it (None: every row is a
    # token): the graph masks those logits so no runtime's argmax or sampling can pick them.
    n_tokens: int | None = None


def build_decoder(model: GPT, projections: dict[str, Projection], options: BuildOptions) -> onnx.ModelProto:
    """The decoder ModelProto of `model`, with `projections` (see `collect_projections`)."""
    return DecoderBuilder(model, projections, options).build()


class DecoderBuilder:
    """Writes the decoder graph of one model, a part at a time, in the order its nodes run:
    the attention bias, the embeddings, each block (attention, MLP), the LM head. A node that
    makes a graph output names it (`logits`, `present.{i}.key` / `.value`, as export.spec does).
    One builder writes one graph."""

    def __init__(self, model: GPT, projections: dict[str, Projection], options: BuildOptions):
        self.cfg = model.config
        self.spec = DecoderSpec.from_config(self.cfg)
        self.projections = projections
        self.options = options
        self.g = OnnxGraph(options.dtype)
        self.np_dt = NUMPY_TYPES[options.dtype]
        self.sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        # A quantized embedding keeps its (dequantized) table as a non-persistent buffer.
        self.sd["transformer.wte.weight"] = model.transformer.wte.weight.detach().float().cpu().numpy()
        # Integer weights are stored once however many nodes read them (the LM head's also
        # serve the embedding lookup): projection name -> its initializers, per kernel.
        self._nbits: dict[str, list[str]] = {}
        self._dynamic: dict[str, list[str]] = {}
        self._wte_t: str | None = None  # the float tied matrix (C, V) when the head is not quantized
        self._head_shapes: tuple[str, str] | None = None  # the unfused attention's reshape targets

    def build(self) -> onnx.ModelProto:
        """The whole graph as a ModelProto. Raises ExportError on a second call (the nodes of the
        first graph are still there)."""
        if self.g.nodes:
            raise ExportError("a DecoderBuilder writes one graph and has written it; make a new builder")
        attn_bias = self.attention_bias()
        tok = self.token_embeddings()
        pos = self.position_embeddings()
        # x: normalized input of the current sublayer; resid: the residual stream it adds to.
        x, resid = self.skip_ln(tok, pos, "transformer.h.0.ln_1", None)
        if not self.options.fused:  # made once, here, for every block's standard-op attention
            i64 = np.int64
            self._head_shapes = (self.g.const("shape_bthd", [0, 0, self.cfg.n_head, self.cfg.head_dim], i64),
                                 self.g.const("shape_btc", [0, 0, self.cfg.n_embd], i64))
        for i in range(self.cfg.n_layer):
            x, resid = self.block(i, x, resid, attn_bias)
        self.lm_head(x)
        return self.model_proto()

    # -- inputs and outputs: ids, mask, positions and the KV cache ----------------------------

    def inputs(self) -> list[onnx.ValueInfoProto]:
        """input_ids, attention_mask, position_ids and each layer's past key and value."""
        spec, shapes = self.spec, self.spec.input_shapes()
        ids = [helper.make_tensor_value_info(n, TensorProto.INT64, shapes[n])
               for n in (spec.input_ids, spec.attention_mask, spec.position_ids)]
        return ids + [helper.make_tensor_value_info(n, ONNX_TYPES[self.options.dtype], shapes[n])
                      for n in spec.past_names]

    def outputs(self) -> list[onnx.ValueInfoProto]:
        """logits and each layer's present key and value."""
        shapes = self.spec.output_shapes()
        return [helper.make_tensor_value_info(n, ONNX_TYPES[self.options.dtype], shapes[n])
                for n in self.spec.output_names]

    def model_proto(self) -> onnx.ModelProto:
        """The ModelProto of the nodes written so far, with its opsets and metadata."""
        g = self.g
        graph = helper.make_graph(g.nodes, "compactgpt_decoder", self.inputs(), self.outputs(), g.inits)
        opsets = [helper.make_opsetid("", self.options.opset)]
        if any(n.domain == MS_DOMAIN for n in g.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        proto = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="compactgpt")
        for k, v in self.options.extra_meta.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
        return proto

    # -- attention bias (B, 1, T, P+T), shared by every layer ---------------------------------

    def attention_bias(self) -> str:
        """0 where a query may attend to a key (causal and not masked), the dtype's lowest value
        elsewhere."""
        g, spec, i64, np_dt = self.g, self.spec, np.int64, self.np_dt
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
        return g.one("Where", [allowed, g.const("zero_f", np.zeros((), np_dt), np_dt),
                               g.const("min_f", np.array(np.finfo(np_dt).min, np_dt), np_dt)], name="attention_bias")

    # -- embeddings: the tied matrix is stored once, as the LM head's (C, V) or its codes -----

    def token_embeddings(self) -> str:
        """The tokens' rows (B, T, C), read from where the LM head keeps the tied matrix."""
        g, ids, head = self.g, self.spec.input_ids, self.projections.get("lm_head")
        if head is None or head.nbits is None:
            self._wte_t = g.init("transformer.wte.weight_t", self.sd["transformer.wte.weight"].T.copy())
            tok = g.one("Gather", [self._wte_t, ids], axis=1)  # (C, B, T)
            return g.one("Transpose", [tok], perm=[1, 2, 0])  # (B, T, C)
        if self.on_dynamic_int8(head):
            return int8_lookup(g, self.dynamic_inits(head), ids)
        if head.nbits.order is None:
            return nbits_lookup(g, head.nbits, self.nbits_inits(head), ids)
        # Activation-ordered codes have permuted columns: the lookup keeps a float table.
        return g.one("Gather", [g.init("transformer.wte.weight", self.sd["transformer.wte.weight"]), ids], axis=0)

    def position_embeddings(self) -> str:
        """The positions' rows (B, T, C)."""
        g, wpe = self.g, self.sd["transformer.wpe.weight"]
        if self.options.dtype == "fp32" and np.array_equal(wpe.astype(np.float16).astype(np.float32), wpe):
            # A table of float16 numbers (quantized embeddings round it so): stored in float16,
            # rows cast after the lookup, the same values at half the bytes.
            table = g.init("transformer.wpe.weight", wpe.astype(np.float16), cast=False)
            return g.one("Cast", [g.one("Gather", [table, self.spec.position_ids], axis=0)], to=TensorProto.FLOAT)
        return g.one("Gather", [g.init("transformer.wpe.weight", wpe), self.spec.position_ids], axis=0)

    # -- one block: attention, then MLP, each closed by a (skip) LayerNorm ---------------------

    def block(self, i: int, x: str, resid: str, attn_bias: str) -> tuple[str, str]:
        """(normalized input of the next sublayer, residual stream) after block i."""
        a, a_bias = self.attention(i, x, attn_bias)
        x, resid = self.skip_ln(a, resid, f"transformer.h.{i}.ln_2", a_bias)
        m, m_bias = self.mlp(i, x)
        nxt = f"transformer.h.{i + 1}.ln_1" if i + 1 < self.cfg.n_layer else "transformer.ln_f"
        return self.skip_ln(m, resid, nxt, m_bias)

    def attention(self, i: int, x: str, attn_bias: str) -> tuple[str, str | None]:
        """Block i's attention projected by c_proj, and the bias the next skip LayerNorm adds
        (None when the projection added it). Makes the graph's present.{i}.key / .value."""
        pre = f"transformer.h.{i}"
        c_attn = self.projections[f"{pre}.attn.c_attn"]
        if self.options.fused:
            heads = self.fused_attention(i, x, c_attn, attn_bias)
        else:
            heads = self.standard_attention(i, x, c_attn, attn_bias)
        return self.projected(heads, self.projections[f"{pre}.attn.c_proj"])

    def fused_attention(self, i: int, x: str, c_attn: Projection, attn_bias: str) -> str:
        """Attention (B, T, C) as ONNX Runtime's MultiHeadAttention, which adds the qkv bias and
        returns the present KV."""
        g, spec, C = self.g, self.spec, self.cfg.n_embd
        qkv = self.matmul(x, c_attn, with_bias=False)
        q, k, v = g.op("Split", [qkv, g.const("split", [C, C, C], np.int64)], n_out=3, axis=-1)
        return g.op("MultiHeadAttention", [q, k, v, self.bias_of(c_attn), "", attn_bias, spec.past_key(i),
                                           spec.past_value(i)],
                    name=f"transformer.h.{i}.attn", domain=MS_DOMAIN, num_heads=self.cfg.n_head,
                    scale=1.0 / math.sqrt(self.cfg.head_dim),
                    outputs=[f"transformer.h.{i}.attn/out", spec.present_key(i), spec.present_value(i)])[0]

    def standard_attention(self, i: int, x: str, c_attn: Projection, attn_bias: str) -> str:
        """Attention (B, T, C) in standard ops: heads split, past KV concatenated (the present
        KV), scaled scores plus the attention bias, softmax, heads merged."""
        g, spec, C = self.g, self.spec, self.cfg.n_embd
        qkv = self.matmul(x, c_attn, with_bias=True)
        q, k, v = g.op("Split", [qkv, g.const("split", [C, C, C], np.int64)], n_out=3, axis=-1)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, nh, T, hs)
        k = g.op("Concat", [spec.past_key(i), k], axis=2, outputs=[spec.present_key(i)])[0]
        v = g.op("Concat", [spec.past_value(i), v], axis=2, outputs=[spec.present_value(i)])[0]
        scores = g.one("MatMul", [q, g.one("Transpose", [k], perm=[0, 1, 3, 2])])
        scale = np.array(1.0 / math.sqrt(self.cfg.head_dim), self.np_dt)
        scores = g.one("Mul", [scores, g.const("scale", scale, self.np_dt)])
        probs = g.one("Softmax", [g.one("Add", [scores, attn_bias])], axis=-1)
        y = g.one("Transpose", [g.one("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        return g.one("Reshape", [y, self._head_shapes[1]])

    def split_heads(self, t: str) -> str:
        """(B, T, C) -> (B, nh, T, hs)."""
        return self.g.one("Transpose", [self.g.one("Reshape", [t, self._head_shapes[0]])], perm=[0, 2, 1, 3])

    def mlp(self, i: int, x: str) -> tuple[str, str | None]:
        """Block i's MLP, and the bias of its output projection the next skip LayerNorm adds
        (None when the projection added it)."""
        pre, fused = f"transformer.h.{i}", self.options.fused
        c_fc = self.projections[f"{pre}.mlp.c_fc"]
        h = self.matmul(x, c_fc, with_bias=not fused)
        h = gelu(self.g, h, self.bias_of(c_fc) if fused else None, self.cfg.activation_function, fused)
        return self.projected(h, self.projections[f"{pre}.mlp.c_proj"])

    def projected(self, x: str, p: Projection) -> tuple[str, str | None]:
        """(x @ W, the bias left to the fused skip LayerNorm), or (x @ W + bias, None) unfused."""
        fused = self.options.fused
        y = self.matmul(x, p, with_bias=not fused)
        return y, (self.bias_of(p) if fused else None)

    # -- the LM head: the graph's logits ------------------------------------------------------

    def lm_head(self, x: str) -> str:
        """The logits (B, T, V), under the spec's name, with the embedding's rows past the
        tokenizer (vocabulary padding) masked to the dtype's lowest value."""
        g, spec, head = self.g, self.spec, self.projections.get("lm_head")
        n_tokens = self.options.n_tokens
        padding = (np.arange(self.cfg.vocab_size) >= n_tokens
                   if n_tokens is not None and n_tokens < self.cfg.vocab_size else None)
        quantized = head is not None and head.nbits is not None
        # The padding mask as a quantized head's bias: float32 logits are far smaller than half an
        # ulp of the lowest float32 (2^103), so logit + lowest rounds to lowest exactly, as the Where
        # below gives, and the head's kernel adds it for free. float16's lowest (-65504) has an
        # ulp of 32: it keeps the Where.
        mask_in_head = padding is not None and quantized and self.options.dtype == "fp32"
        masked_after = padding is not None and not mask_in_head
        out = None if masked_after else [spec.logits]
        if quantized and mask_in_head:
            lowest = np.where(padding, np.finfo(np.float32).min, 0)
            bias = (lowest if head.bias is None else lowest + head.bias).astype(np.float32)
            head = Projection(head.name, bias, nbits=head.nbits, act_bits=head.act_bits)
        if quantized:
            logits = self.matmul(x, head, with_bias=True, outputs=out)
        else:
            logits = g.one("MatMul", [x, self._wte_t], name="lm_head", outputs=out)  # (B, T, V)
        if masked_after:
            # Padding rows: replaced (not offset) by the dtype's lowest value, as PyTorch's
            # mask_padded_vocab does, so parity holds exactly there and nothing is ever -inf/NaN.
            lowest = g.const("vocab_padding_value", np.array(np.finfo(self.np_dt).min, self.np_dt), self.np_dt)
            logits = g.one("Where", [g.const("vocab_padding", padding, np.bool_), lowest, logits], name="vocab_mask",
                           outputs=[spec.logits])
        return logits

    # -- projections and LayerNorms --------------------------------------------------------------

    def on_dynamic_int8(self, p: Projection | None) -> bool:
        """Whether p runs on DynamicQuantizeMatMul (int8 weights and --int8-kernel dynamic)."""
        return p is not None and p.nbits is not None and p.nbits.bits == 8 and self.options.int8_kernel == "dynamic"

    def nbits_inits(self, p: Projection) -> list[str]:
        """(codes, scales[, zero points]) of a MatMulNBits projection, written on first use; the zero
        points are left out where they are all the middle code (symmetric codes), the default."""
        if p.name not in self._nbits:
            nb = p.nbits
            scales = nb.scales.astype(self.np_dt)
            if self.np_dt == np.float32 and np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
                # float16 holds every scale (quantize rounds them so): stored at half the bytes and cast
                # once, which ONNX Runtime folds into a float32 initializer when the session loads.
                half = self.g.init(p.name + ".scales_fp16", scales.astype(np.float16), cast=False)
                scales = self.g.one("Cast", [half], name=p.name + ".scales_cast", to=TensorProto.FLOAT,
                                    outputs=[p.name + ".scales"])
            else:
                scales = self.g.init(p.name + ".scales", scales)
            self._nbits[p.name] = [self.g.init(p.name + ".qweight", nb.packed), scales]
            if not nb.default_zero_points:
                self._nbits[p.name].append(self.g.init(p.name + ".qzeros", nb.zero_points))
        return self._nbits[p.name]

    def dynamic_inits(self, p: Projection) -> list[str]:
        """(codes, scales, zero points) of a DynamicQuantizeMatMul projection, written on first use."""
        if p.name not in self._dynamic:
            self._dynamic[p.name] = dynamic_int8_inits(self.g, p)
        return self._dynamic[p.name]

    def matmul(self, x: str, p: Projection, with_bias: bool, outputs: list[str] | None = None) -> str:
        """x @ W (+ bias when with_bias; otherwise the caller folds the bias into a fused op);
        `outputs` names the result."""
        g = self.g
        if self.on_dynamic_int8(p):
            return dynamic_int8_matmul(g, x, p, self.dynamic_inits(p), with_bias, outputs)
        if p.nbits is not None:
            nb = p.nbits
            if nb.order is not None:
                x = g.one("Gather", [x, g.const(p.name + ".order", nb.order, np.int64)], axis=-1)
            ins = [x, *self.nbits_inits(p)]
            if with_bias and p.bias is not None:  # inputs: A, B, scales, zero_points, g_idx, bias
                ins += [""] * (5 - len(ins)) + [g.init(p.name + ".bias", p.bias)]
            # SmoothQuant's W8A8 layers were calibrated for int8 activations: level 4 is their
            # arithmetic whatever the weight-only layers use.
            level = 4 if p.act_bits == 8 else self.options.accuracy_level
            return g.one("MatMulNBits", ins, domain=MS_DOMAIN, name=p.name, K=nb.k, N=nb.n, bits=nb.bits,
                         block_size=nb.block_size, accuracy_level=level, outputs=outputs)
        add_bias = with_bias and p.bias is not None
        y = g.one("MatMul", [x, g.init(p.name + ".weight", p.weight)], name=p.name,
                  outputs=None if add_bias else outputs)
        return g.one("Add", [y, g.init(p.name + ".bias", p.bias)], outputs=outputs) if add_bias else y

    def bias_of(self, p: Projection) -> str:
        """The initializer of p's bias (zeros when it has none), for a fused op to add."""
        b = p.bias if p.bias is not None else np.zeros(p.nbits.n if p.nbits else p.weight.shape[1], np.float32)
        return self.g.init(p.name + ".bias", b)

    def layer_norm(self, x: str, prefix: str) -> str:
        """LayerNormalization of x with the weights at `prefix`."""
        g = self.g
        return g.one("LayerNormalization", [x, g.init(prefix + ".weight", self.sd[prefix + ".weight"]),
                                            g.init(prefix + ".bias", self.sd[prefix + ".bias"])],
                     axis=-1, epsilon=self.cfg.layer_norm_epsilon)

    def skip_ln(self, x: str, skip: str, prefix: str, bias: str | None) -> tuple[str, str]:
        """(LayerNorm(x + skip + bias), x + skip + bias)."""
        g = self.g
        if self.options.fused:
            ins = [x, skip, g.init(prefix + ".weight", self.sd[prefix + ".weight"]),
                   g.init(prefix + ".bias", self.sd[prefix + ".bias"])] + ([bias] if bias else [])
            name = g.fresh("SkipLayerNorm")
            out = g.op("SkipLayerNormalization", ins, name=name, domain=MS_DOMAIN, epsilon=self.cfg.layer_norm_epsilon,
                       outputs=[f"{name}/out", "", "", f"{name}/sum"])
            return out[0], out[3]
        s = g.one("Add", [x, bias]) if bias else x
        s = g.one("Add", [s, skip])
        return self.layer_norm(s, prefix), s


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
