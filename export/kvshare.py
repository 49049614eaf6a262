"""The shared KV cache: a decoder graph whose past and present KV can be one buffer.

MultiHeadAttention returns present = concat(past, new) as a new tensor, so every decode step
copies the whole cache and step time grows with the text. ONNX Runtime's GroupQueryAttention
instead writes the new keys and values into its past buffer in place when past and present are
bound to the same memory (a buffer of the generation's full capacity, the valid length read
from the attention mask): nothing grows but attention's own reads. `share_kv_cache` rewrites
the fused graph's attention that way; everything else, names and axes included, stays as it
was, so the graph still runs with a past and present of their own (Optimum, any runtime).

What it gives up: GroupQueryAttention takes each row's valid tokens to be its first ones, so a
batch whose rows are left-padded is not supported (the runtime refuses one with a clear error).
"""

from __future__ import annotations

import numpy as np

from .errors import ExportError
from .nbits import set_nodes
from .spec import MS_DOMAIN, DecoderSpec

KV_CACHE_KEY = "kv_cache"  # graph metadata: "shared" for a graph rewritten here


def share_kv_cache(proto, spec: DecoderSpec):
    """Rewrite a fused decoder graph (onnx.ModelProto) in place, and return it: each
    MultiHeadAttention becomes Add(bias) + GroupQueryAttention over the same past/present names,
    and the attention bias it no longer needs is removed. In place because the exporter's graph
    holds every weight: a copy would double the memory of the largest exports. Raises ExportError
    for a graph without MultiHeadAttention (an unfused export: --no-optimize)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    if not any(n.op_type == "MultiHeadAttention" for n in graph.node):
        raise ExportError("a shared KV cache rewrites the fused graph's MultiHeadAttention; this graph has none "
                          "(exported with --no-optimize): export with the fused graph")
    # GroupQueryAttention's lengths: the valid tokens per row (minus one) and the total length.
    lengths = [
        helper.make_node("ReduceSum", [spec.attention_mask, "kv_share.axis1"], ["kv_share.len"], keepdims=0),
        helper.make_node("Sub", ["kv_share.len", "kv_share.one"], ["kv_share.len_minus_1"]),
        helper.make_node("Cast", ["kv_share.len_minus_1"], ["kv_share.seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [spec.attention_mask], ["kv_share.total_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["kv_share.total_1d", "kv_share.axis0"], ["kv_share.total64"]),
        helper.make_node("Cast", ["kv_share.total64"], ["kv_share.total"], to=TensorProto.INT32),
    ]
    added = [numpy_helper.from_array(np.array([1], np.int64), "kv_share.axis1"),
             numpy_helper.from_array(np.array([0], np.int64), "kv_share.axis0"),
             numpy_helper.from_array(np.array(1, np.int64), "kv_share.one")]
    nodes = []
    for node in graph.node:
        if node.op_type != "MultiHeadAttention":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q, k, v, bias, _, _, past_key, past_value = list(node.input) + [""] * (8 - len(node.input))
        b = numpy_helper.to_array(inits[bias])
        width = b.size // 3
        biased = []
        for j, x in enumerate((q, k, v)):  # MultiHeadAttention added the bias itself
            name = f"{node.name}.bias_{'qkv'[j]}"
            added.append(numpy_helper.from_array(np.ascontiguousarray(b[j * width:(j + 1) * width]), name))
            nodes.append(helper.make_node("Add", [x, name], [f"{name}/out"], name=f"{name}/add"))
            biased.append(f"{name}/out")
        nodes.append(helper.make_node(
            "GroupQueryAttention", biased + [past_key, past_value, "kv_share.seqlens_k", "kv_share.total"],
            list(node.output), name=node.name, domain=MS_DOMAIN, num_heads=attrs["num_heads"],
            kv_num_heads=attrs["num_heads"], scale=attrs["scale"]))
    set_nodes(graph, lengths + nodes, added)
    entry = proto.metadata_props.add()
    entry.key, entry.value = KV_CACHE_KEY, "shared"
    return proto


def shares_kv_cache(model_file) -> bool:
    """Whether a decoder graph file was written with a shared KV cache (its metadata says so)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    return any(p.key == KV_CACHE_KEY and p.value == "shared" for p in proto.metadata_props)
