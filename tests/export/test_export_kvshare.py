"""--kv-cache shared: GroupQueryAttention appends into one preallocated buffer bound as both past
and present, so nothing is copied per step; the graph still computes what the copying graph
computes."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from compactgpt.artifacts import read_manifest, save_model
from compactgpt.errors import ConfigError
from export import ExportConfig, OnnxDecoder, export_onnx
from tests.conftest import random_gpt

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from compactgpt.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("kv")
    tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_model(root / "m", random_gpt(3, n_positions=128), tok, stage="pretrain", settings={})
    return {kind: export_onnx(ExportConfig(model=str(root / "m"), out=str(root / kind), kv_cache=kind), **QUIET)
            for kind in ("copy", "shared")}


def test_shared_export_is_validated_and_declares_itself(exports):
    graph = onnx.load(str(exports["shared"] / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "GroupQueryAttention" in ops and "MultiHeadAttention" not in ops
    # q, k and v packed in the projection's output: no Split, and the bias added once, before
    assert "Split" not in ops
    for node in (n for n in graph.graph.node if n.op_type == "GroupQueryAttention"):
        assert list(node.input[1:3]) == ["", ""]
    assert {p.key: p.value for p in graph.metadata_props}["kv_cache"] == "shared"
    manifest = read_manifest(exports["shared"])
    assert manifest.metrics["parity_max_logits_diff"] < 1e-4
    assert not any("left-padded" in case for case in manifest.extra["parity"]["cases"])
    assert json.loads((exports["shared"] / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    assert not json.loads((exports["copy"] / "genai_config.json").read_text())["search"]["past_present_share_buffer"]


@pytest.mark.parametrize("batch", [1, 3])
def test_shared_cache_generates_what_the_copying_graph_generates(exports, batch):
    ids = torch.randint(0, 280, (batch, 7), generator=torch.Generator().manual_seed(batch))
    copy, shared = OnnxDecoder(exports["copy"]), OnnxDecoder(exports["shared"])
    assert shared.shared_kv and not copy.shared_kv
    assert torch.equal(shared.generate(ids, 60), copy.generate(ids, 60))
    # sampling goes through the same cache
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(shared.generate(ids, 30, temperature=1.0, generator=g()),
                       copy.generate(ids, 30, temperature=1.0, generator=g()))


def test_shared_cache_is_one_buffer_per_tensor_bound_as_past_and_present(exports):
    decoder = OnnxDecoder(exports["shared"])
    cache = decoder.new_cache(1, 64)
    assert len(cache.pointers()) == len(decoder.spec.past_names)  # the copying cache holds two each
    before = cache.pointers()
    cache.run(torch.tensor([[5, 6, 7]]).numpy(), torch.tensor([[0, 1, 2]]).numpy())
    for step in range(5):
        cache.run(torch.tensor([[8]]).numpy(), torch.tensor([[3 + step]]).numpy())
    assert cache.pointers() == before and cache.length == 8
    assert len(OnnxDecoder(exports["copy"]).new_cache(1, 64).pointers()) == 2 * len(decoder.spec.past_names)


def test_shared_cache_refuses_left_padding_and_the_unfused_graph(exports):
    ids = torch.tensor([[0, 5, 6], [4, 5, 6]])
    with pytest.raises(ConfigError, match="left-padded"):
        next(OnnxDecoder(exports["shared"]).stream(ids, 3, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])))
    with pytest.raises(ConfigError, match="no-optimize"):
        ExportConfig(model="m", out="o", kv_cache="shared", optimize=False)


@pytest.mark.parametrize("kernel", ["int4 MatMulNBits", "int8 DynamicQuantizeMatMul"])
def test_quantized_projections_take_the_attention_bias_into_their_kernel(tmp_path, kernel):
    """The shared rewrite hands the q/k/v bias to the projection's own bias input (no Add), and
    the graph still generates what the copying graph of the same quantized model generates."""
    from compactgpt.tokenizer import train_bpe
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_model(tmp_path / "m", random_gpt(4, n_positions=128), tok, stage="pretrain", settings={})
    bits, group, settings = (4, 16, {}) if kernel.startswith("int4") else (8, 0, {"int8_kernel": "dynamic"})
    method = RTNConfig(bits=bits, group_size=group, include_embeddings=True)
    quantize_folder(QuantizeConfig(model=str(tmp_path / "m"), out=str(tmp_path / "q"), method=method, progress=False),
                    log=lambda m: None)
    out = {kind: export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / kind), kv_cache=kind,
                                          **settings), **QUIET) for kind in ("copy", "shared")}
    nodes = onnx.load(str(out["shared"] / "model.onnx")).graph.node
    op = kernel.split()[1]
    c_attn = [n for n in nodes if n.op_type == op and n.name.endswith("attn.c_attn")]
    assert c_attn and all(n.input[4 if op == "DynamicQuantizeMatMul" else 5].endswith(".bias") for n in c_attn)
    assert not [n for n in nodes if n.op_type in ("Add", "Split")]
    ids = torch.randint(0, 280, (2, 5), generator=torch.Generator().manual_seed(0))
    copy, shared = OnnxDecoder(out["copy"]), OnnxDecoder(out["shared"])
    assert torch.allclose(shared.logits(ids), copy.logits(ids), atol=1e-4)
    assert torch.equal(shared.generate(ids, 40), copy.generate(ids, 40))
