"""Quantized ONNX: quantize/'s integer weights laid out as MatMulNBits, checked against the
PyTorch quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactgpt.artifacts import implied_parameters, read_manifest
from compactgpt.errors import ConfigError
from export import ExportConfig, OnnxDecoder, export_onnx
from export.config import ExportError
from export.graph import BuildOptions, build_decoder, collect_projections
from export.nbits import block_size_for, contiguous_order, dequantize_nbits, pack_nibbles, to_nbits, unpack_nibbles
from export.spec import MODEL_FILE, DecoderSpec
from export.validate import validate
from quantize.format import QuantizedWeight, pack_int4
from tests.conftest import random_gpt

api = pytest.importorskip("quantize.api")


def random_qweight(n, k, bits, group_size, act_order=False, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=g) * 0.01 + 1e-3
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=g)].to(torch.int32)
    return QuantizedWeight(bits, group_size, codes, scales, zeros, g_idx)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40))
def test_pack_nibbles_round_trip(rows, cols):
    codes = np.random.default_rng(rows * 100 + cols).integers(0, 16, (rows, cols)).astype(np.uint8)
    assert np.array_equal(unpack_nibbles(pack_nibbles(codes), cols), codes)


def test_pack_nibbles_matches_quantize_format():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert np.array_equal(pack_nibbles(codes.numpy()), pack_int4(codes).numpy())


@pytest.mark.parametrize("bits,k,group,act_order", [
    (4, 128, 32, False), (4, 96, 96, False), (8, 768, 768, False), (4, 1024, 512, False),
    (4, 128, 32, True), (8, 64, 16, True), (4, 48, 16, False),
])
def test_to_nbits_keeps_the_dequantized_weight(bits, k, group, act_order):
    q = random_qweight(6, k, bits, group, act_order)
    nb = to_nbits(q.codes.numpy(), q.scales.numpy(), q.zeros.numpy(), bits, group,
                  None if q.g_idx is None else q.g_idx.numpy())
    assert nb.block_size in (16, 32, 64, 128, 256) and k % nb.block_size == 0
    np.testing.assert_array_equal(dequantize_nbits(nb), q.dequantize().numpy())
    assert (nb.order is not None) == act_order


def test_layouts_matmulnbits_cannot_hold():
    with pytest.raises(ExportError, match="multiple of 16"):
        block_size_for(8, 64)
    g_idx = np.array([0, 0, 0, 1])  # group 0 has three columns, group 1 one
    with pytest.raises(ExportError, match="exactly group_size"):
        contiguous_order(g_idx, 2, 4)


@pytest.mark.parametrize("act_order", [False, True])
def test_graph_with_integer_weights_matches_pytorch_exactly(act_order):
    from quantize.modules import QuantLinear, set_module

    model = random_gpt(2)
    for i in range(model.config.n_layer):
        for j, sub in enumerate(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")):
            name = f"transformer.h.{i}.{sub}"
            lin = model.get_submodule(name)
            q = random_qweight(lin.out_features, lin.in_features, 4, 16, act_order, seed=10 * i + j)
            set_module(model, name, QuantLinear(q, lin.bias))
    proto = build_decoder(model, collect_projections(model), BuildOptions(accuracy_level=0))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 4 * model.config.n_layer
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    report = validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)
    assert report["max_logits_diff"] < 1e-4


def quantized_artifact(folder, tokenizer, config, calibration=None):
    from quantize import load_quantized, save_quantized

    model = random_gpt(0)
    api.quantize_(model, config, calibration)
    save_quantized(folder, model, tokenizer, config)
    return load_quantized(folder).model


@pytest.mark.parametrize("config", [
    dict(bits=4, group_size=32), dict(bits=8, group_size=0), dict(bits=4, group_size=16, include_embeddings=True),
], ids=["int4-g32", "int8-channel", "int4-g16-head"])
def test_quantized_export_matches_pytorch_quantized_model(config, tokenizer, tmp_path):
    from quantize import RTNConfig

    qmodel = quantized_artifact(tmp_path / "q", tokenizer, RTNConfig(**config))
    exact = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "exact"), accuracy_level=0),
                        log=lambda m: None)
    m = read_manifest(exact)
    # Float activations: the ONNX model computes the PyTorch quantized model's function.
    assert m.metrics["parity_max_logits_diff"] < 1e-4 and m.extra["kind"] == "quantized"
    fast = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "fast"), accuracy_level=4),
                       log=lambda m: None)
    assert read_manifest(fast).metrics["parity_max_logits_rel_diff"] < 0.02
    import onnx

    ops = [n.op_type for n in onnx.load(str(fast / MODEL_FILE)).graph.node]
    n_quant = 4 * qmodel.config.n_layer + (1 if config.get("include_embeddings") else 0)
    assert ops.count("MatMulNBits") == n_quant
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(OnnxDecoder(exact).generate(ids, 10), qmodel.generate(ids, 10))


def test_smoothquant_w8a8_export(tokenizer, tmp_path):
    from quantize import SmoothQuantConfig
    from quantize.api import CalibrationData

    calib = CalibrationData(torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0)), "random")
    quantized_artifact(tmp_path / "sq", tokenizer, SmoothQuantConfig(calib_samples=8), calib)
    out = export_onnx(ExportConfig(model=str(tmp_path / "sq"), out=str(tmp_path / "onnx")), log=lambda m: None)
    assert read_manifest(out).metrics["parity_max_logits_rel_diff"] < 0.02


def test_ort_int8_of_a_quantized_model_is_refused(tokenizer, tmp_path):
    from quantize import RTNConfig

    quantized_artifact(tmp_path / "q", tokenizer, RTNConfig(bits=8))
    with pytest.raises(ConfigError, match="already quantized"):
        export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "o"), ort_int8=True))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_head_serves_the_embedding_lookup_from_the_same_codes(bits, tokenizer, tmp_path):
    """One copy of the tied matrix: the lookup gathers rows of the LM head's own codes
    (GatherBlockQuantized), so no float (V, C) table is written, and the tokens' embeddings are
    exactly the quantized model's."""
    import onnx

    from quantize import RTNConfig

    qmodel = quantized_artifact(tmp_path / "q", tokenizer, RTNConfig(bits=bits, group_size=16, include_embeddings=True))
    out = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), accuracy_level=0),
                      log=lambda m: None)
    graph = onnx.load(str(out / MODEL_FILE)).graph
    V, C = qmodel.config.vocab_size, qmodel.config.n_embd
    assert not [t.name for t in graph.initializer if sorted(t.dims) == sorted([V, C])]  # no float table
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in graph.node if n.output[0] == lookup.input[0])
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name == "lm_head")
    assert reshape.input[0] == head.input[1]  # the head's codes, relabelled, not copied
    wpe = next(t for t in graph.initializer if t.name == "transformer.wpe.weight")
    assert wpe.data_type == onnx.TensorProto.FLOAT16  # float16 numbers since quantization: half the bytes
    metrics = read_manifest(out).metrics
    assert metrics["parity_max_logits_diff"] < 1e-4
    assert metrics["bits_per_parameter"] == 8 * metrics["onnx_bytes"] / implied_parameters(qmodel.config)


def test_dynamic_int8_kernel_runs_per_channel_blocks_on_dynamicquantizematmul(tokenizer, tmp_path):
    import onnx
    import onnxruntime as ort

    from quantize import RTNConfig

    qmodel = quantized_artifact(tmp_path / "q", tokenizer, RTNConfig(bits=8, group_size=0, include_embeddings=True))
    out = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), int8_kernel="dynamic"),
                      log=lambda m: None)
    graph = onnx.load(str(out / MODEL_FILE)).graph
    dynamic = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(dynamic) == 4 * qmodel.config.n_layer + 1 and dynamic[-1].name == "lm_head"
    assert not [n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    # the lookup gathers the head's own int8 codes: no float (V, C) table in the file
    V, C = qmodel.config.vocab_size, qmodel.config.n_embd
    assert not [t.name for t in graph.initializer if sorted(t.dims) == sorted([V, C]) and t.data_type == 1]
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == dynamic[-1].input[1]]
    assert len(gathers) == 1
    # per-tensor int8 activations: held to the quantized tolerance against the PyTorch model
    assert read_manifest(out).metrics["parity_max_logits_rel_diff"] < 0.05
    # the lookup itself is exact: the first layer's input equals PyTorch's dequantized rows
    ids = torch.tensor([[3, 4, 5, 300]])
    lookup = next(n for n in graph.node if n.name == "transformer.wte").output[0]
    proto = onnx.load(str(out / MODEL_FILE))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(lookup, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = DecoderSpec.from_config(qmodel.config)
    feeds = {spec.input_ids: ids.numpy(), spec.attention_mask: np.ones((1, 4), np.int64),
             spec.position_ids: np.arange(4)[None]}
    feeds.update({name: np.zeros((1, spec.n_head, 0, spec.head_dim), np.float32) for name in spec.past_names})
    rows = session.run([lookup], feeds)[0]
    assert np.array_equal(rows, qmodel.transformer.wte(ids).detach().numpy())
    assert OnnxDecoder(out).generate(torch.tensor([[3, 4, 5]]), 8).shape == (1, 11)


def test_dynamic_int8_kernel_refuses_what_it_cannot_run(tokenizer, tmp_path):
    from quantize import RTNConfig

    quantized_artifact(tmp_path / "q", tokenizer, RTNConfig(bits=8, group_size=16))
    with pytest.raises(ExportError, match="per-channel"):
        export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), int8_kernel="dynamic"),
                    log=lambda m: None)
    for bad in (dict(accuracy_level=0), dict(dtype="fp16"), dict(int8_kernel="fast")):
        with pytest.raises(ConfigError):
            ExportConfig(model="m", out="o", **{"int8_kernel": "dynamic", **bad})



def test_an_int8_head_beside_int4_blocks_exports_one_8_bit_copy_for_head_and_lookup(tokenizer, tmp_path):
    import onnx

    from quantize import RTNConfig

    qmodel = quantized_artifact(tmp_path / "q", tokenizer,
                                RTNConfig(bits=4, group_size=16, include_embeddings=True, head_bits=8))
    out = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), accuracy_level=0),
                      log=lambda m: None)
    nodes = onnx.load(str(out / MODEL_FILE)).graph.node
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits.pop("lm_head") == 8 and bits.pop("transformer.wte") == 8
    assert set(bits.values()) == {4} and len(bits) == 4 * qmodel.config.n_layer
    assert read_manifest(out).metrics["parity_max_logits_diff"] < 1e-4
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(OnnxDecoder(out).generate(ids, 8), qmodel.generate(ids, 8))

@pytest.mark.slow
def test_int4_g32_export_of_the_124m_shape_stores_at_most_5_3_bits_per_parameter(tmp_path):
    """12 x 768, vocabulary 8192, embeddings included: one copy of the tied matrix (head and
    lookup from the same codes) and a float16 position table keep the file near its 4.5 bits
    of codes and block scales (measured 5.26; 7.58 with a float lookup table)."""
    from compactgpt.artifacts import save_model
    from compactgpt.model import GPT, GPTConfig
    from compactgpt.tokenizer import train_bpe
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    torch.manual_seed(0)
    tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    config = GPTConfig(vocab_size=8192, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    save_model(tmp_path / "m", GPT(config).eval(), tok, stage="pretrain", settings={})
    method = RTNConfig(bits=4, group_size=32, include_embeddings=True)
    quantize_folder(QuantizeConfig(model=str(tmp_path / "m"), out=str(tmp_path / "q"), method=method, progress=False),
                    log=lambda m: None)
    out = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx")), log=lambda m: None)
    assert read_manifest(out).metrics["bits_per_parameter"] <= 5.3
