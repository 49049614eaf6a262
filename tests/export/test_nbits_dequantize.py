"""export.nbits.dequantize_linear_graph: MatMulNBits written as DequantizeLinear + MatMul computes
what MatMulNBits computes with float activations, in a file no bigger than the codes need."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compactgpt.artifacts import save_model
from export import ExportConfig, export_onnx
from export.nbits import dequantize_linear_graph
from export.spec import DecoderSpec
from quantize import QuantizeConfig, RTNConfig, quantize_folder
from tests.conftest import random_gpt

QUIET = dict(log=lambda m: None)


def logits(path, fold: bool, spec: DecoderSpec) -> np.ndarray:
    options = ort.SessionOptions()
    if fold:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.array([[5, 9, 17, 3, 60, 2]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None, :]}
    feeds.update({n: np.zeros((1, spec.n_head, 0, spec.head_dim), np.float32) for n in spec.past_names})
    out = session.run(["logits"], feeds)[0]
    return np.where(np.abs(out) < 1e30, out, 0.0)  # vocabulary padding is masked to -inf-like values


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 32), (8, 16)])
def test_dequantize_linear_graph_computes_what_matmulnbits_computes(tmp_path, byte_tokenizer, bits, group):
    save_model(tmp_path / "m", random_gpt(1), byte_tokenizer, stage="pretrain", settings={})
    method = RTNConfig(bits=bits, group_size=group, include_embeddings=True)
    quantize_folder(QuantizeConfig(model=str(tmp_path / "m"), out=str(tmp_path / "q"), method=method, progress=False),
                    **QUIET)
    # accuracy_level 0: MatMulNBits with float activations, the arithmetic of the rewrite
    export = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), accuracy_level=0), **QUIET)
    original = onnx.load(str(export / "model.onnx"))
    proto, rewritten = dequantize_linear_graph(original)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in original.graph.node)
    assert rewritten == n_nbits > 0
    # the tied lookup read the head's codes: it becomes a Gather of the same dequantized matrix
    assert any(n.op_type == "GatherBlockQuantized" for n in original.graph.node)
    assert not any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in proto.graph.node)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "dq.onnx"))
    # The codes stay packed: the file grows by little more than the unpacked zero points.
    assert (tmp_path / "dq.onnx").stat().st_size < 1.15 * (export / "model.onnx").stat().st_size
    spec = DecoderSpec(n_layer=2, n_head=4, head_dim=8, vocab_size=320)
    expected = logits(export / "model.onnx", False, spec)
    for fold in (False, True):
        np.testing.assert_allclose(logits(tmp_path / "dq.onnx", fold, spec), expected, atol=1e-5)


def test_a_float_graph_is_left_as_it_is(tmp_path, byte_tokenizer):
    save_model(tmp_path / "m", random_gpt(0), byte_tokenizer, stage="pretrain", settings={})
    export = export_onnx(ExportConfig(model=str(tmp_path / "m"), out=str(tmp_path / "onnx")), **QUIET)
    original = onnx.load(str(export / "model.onnx"))
    proto, rewritten = dequantize_linear_graph(original)
    assert rewritten == 0 and proto.opset_import == original.opset_import and proto.graph == original.graph
