"""The decoder graph builder: each graph output is named by the node that makes it, in every
layout of the graph (fused or standard ops, float or quantized head, vocabulary padding)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from export.errors import ExportError
from export.graph import BuildOptions, DecoderBuilder, build_decoder, collect_projections
from export.spec import DecoderSpec
from tests.conftest import random_gpt


def quantized_gpt(bits: int, group_size: int):
    from quantize import RTNConfig, quantize_

    model = random_gpt(2)
    quantize_(model, RTNConfig(bits=bits, group_size=group_size, include_embeddings=True))
    return model


@pytest.mark.parametrize("head,options,producer", [
    ("float", dict(), "lm_head"),
    ("float", dict(fused=False), "lm_head"),
    ("float", dict(n_tokens=300), "vocab_mask"),
    ("int4", dict(), "lm_head"),
    ("int4", dict(n_tokens=300), "lm_head"),  # the padding mask rides in the head's bias
    ("int4", dict(n_tokens=300, dtype="fp16"), "vocab_mask"),
    ("int8", dict(int8_kernel="dynamic", fused=False), "lm_head"),
])
def test_each_graph_output_is_named_by_the_node_that_makes_it(head, options, producer):
    model = random_gpt(2) if head == "float" else quantized_gpt(*{"int4": (4, 16), "int8": (8, 0)}[head])
    proto = build_decoder(model, collect_projections(model), BuildOptions(**options))
    spec = DecoderSpec.from_config(model.config)
    made_by = {out: node for node in proto.graph.node for out in node.output if out}
    assert [o.name for o in proto.graph.output] == spec.output_names
    assert made_by[spec.logits].name == producer
    for i in range(model.config.n_layer):
        attention = "MultiHeadAttention" if options.get("fused", True) else "Concat"
        assert made_by[spec.present_key(i)].op_type == attention
        assert made_by[spec.present_value(i)].op_type == attention
    outputs = [out for node in proto.graph.node for out in node.output if out]
    assert len(outputs) == len(set(outputs))  # every tensor made once


def test_a_builder_writes_one_graph_the_same_as_build_decoder():
    model = quantized_gpt(4, 16)
    projections = collect_projections(model)
    builder = DecoderBuilder(model, projections, BuildOptions(n_tokens=300))
    first = builder.build()
    again = build_decoder(model, projections, BuildOptions(n_tokens=300))
    assert first.SerializeToString() == again.SerializeToString()
    with pytest.raises(ExportError, match="one graph"):
        builder.build()
    # A quantized fp32 head carries the padding mask in its bias: no Where after it.
    head = next(n for n in first.graph.node if n.name == "lm_head")
    bias = next(t for t in first.graph.initializer if t.name == head.input[5])
    assert (numpy_helper.to_array(bias)[300:] == np.finfo(np.float32).min).all()
