"""ONNX export: parity with PyTorch, runtime generation, Optimum loading, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compactgpt.artifacts import resolved_parent, load_model, read_manifest, save_model
from compactgpt.app.cli import main
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.evaluation import model_logits_fn, perplexity
from export import ExportConfig, OnnxDecoder, export_onnx
from export.graph import BuildOptions, build_decoder, collect_projections
from export.spec import DATA_FILE, GENAI_CONFIG, MODEL_FILE, DecoderSpec
from export.validate import CASES, validate
from tests.conftest import random_gpt


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("export") / "model"
    save_model(folder, random_gpt(0), tokenizer, stage="pretrain", settings={})
    return folder


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    return export_onnx(ExportConfig(model=str(artifact), out=str(tmp_path_factory.mktemp("export") / "onnx")),
                       log=lambda m: None)


def session_of(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_graph_matches_pytorch_at_every_case(fused, activation):
    model = random_gpt(1, activation_function=activation)
    session = session_of(build_decoder(model, collect_projections(model), BuildOptions(fused=fused)))
    report = validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)
    assert len(report["cases"]) == len(CASES)
    assert report["max_logits_diff"] < 1e-4 and report["max_present_diff"] < 1e-4


def test_fused_graph_uses_fused_ops_and_matmul_projections():
    model = random_gpt(0)
    proto = build_decoder(model, collect_projections(model), BuildOptions(fused=True))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MultiHeadAttention") == model.config.n_layer
    assert ops.count("SkipLayerNormalization") == 2 * model.config.n_layer + 1
    assert ops.count("FastGelu") == model.config.n_layer
    assert "Gemm" not in ops and "LayerNormalization" not in ops
    assert ops.count("MatMul") == 4 * model.config.n_layer + 1
    unfused = build_decoder(model, collect_projections(model), BuildOptions(fused=False))
    assert all(n.domain in ("", "ai.onnx") for n in unfused.graph.node)


def test_validation_catches_a_wrong_graph():
    from export.config import ParityError

    model = random_gpt(0)
    proto = build_decoder(model, collect_projections(model), BuildOptions())
    other = random_gpt(0)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.weight.mul_(1.01)
    session = session_of(proto)
    with pytest.raises(ParityError, match="differs from PyTorch.*worst output logits"):
        validate(other, session, DecoderSpec.from_config(model.config), atol=1e-4)


def rename_graph_tensor(proto, old: str, new: str) -> None:
    """Rename a graph input or output everywhere it is produced or read."""
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name == old:
            value.name = new
    for node in proto.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


@pytest.mark.parametrize("old,new,error", [
    ("logits", "lm_logits", "OutputNameError"),
    ("present.1.value", "present.1.v", "OutputNameError"),
    ("past_key_values.0.key", "past.0.key", "InputNameError"),
])
def test_a_graph_whose_names_differ_from_the_spec_is_refused_by_name(old, new, error):
    import export.errors

    model = random_gpt(0)
    proto = build_decoder(model, collect_projections(model), BuildOptions())
    rename_graph_tensor(proto, old, new)
    # Values are never compared: the name check comes first and names both tensors.
    with pytest.raises(getattr(export.errors, error), match=f"lacks the .*'{old}'.*'{new}'"):
        validate(model, session_of(proto), DecoderSpec.from_config(model.config), atol=1e-4)


def test_a_fixed_axis_the_spec_makes_dynamic_is_refused():
    from export.errors import AxisError

    model = random_gpt(0)
    proto = build_decoder(model, collect_projections(model), BuildOptions())
    batch = next(i for i in proto.graph.input if i.name == "input_ids").type.tensor_type.shape.dim[0]
    batch.dim_value = 1  # replaces the dim_param "batch_size"
    with pytest.raises(AxisError, match="axis 0 \\(batch_size\\) of input_ids is fixed to 1"):
        validate(model, session_of(proto), DecoderSpec.from_config(model.config), atol=1e-4)


def test_outputs_are_compared_by_name_whatever_their_order():
    model = random_gpt(0)
    spec = DecoderSpec.from_config(model.config)
    proto = build_decoder(model, collect_projections(model), BuildOptions())
    in_order = validate(model, session_of(proto), spec, atol=1e-4)
    outputs = list(proto.graph.output)
    del proto.graph.output[:]
    proto.graph.output.extend(reversed(outputs))  # present.1.value first, logits last
    session = session_of(proto)
    assert [o.name for o in session.get_outputs()][0] == "present.1.value"
    assert validate(model, session, spec, atol=1e-4) == in_order


def test_export_folder_and_manifest(exported, artifact):
    files = {p.name for p in exported.iterdir()}
    assert {MODEL_FILE, "config.json", "tokenizer.json", GENAI_CONFIG, "manifest.json"} <= files
    m = read_manifest(exported)
    assert m.stage == "export" and resolved_parent(exported, m) == artifact.resolve()
    assert m.metrics["parity_max_logits_diff"] < 1e-4 and m.metrics["parity_max_present_diff"] < 1e-4
    assert m.settings["dtype"] == "fp32" and m.settings["optimize"] is True
    genai = json.loads((exported / GENAI_CONFIG).read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2


def test_external_data(artifact, tmp_path):
    out = export_onnx(ExportConfig(model=str(artifact), out=str(tmp_path / "ext"), external_data="always"),
                      log=lambda m: None)
    assert (out / DATA_FILE).stat().st_size > 100_000
    assert (out / MODEL_FILE).stat().st_size < 100_000
    assert OnnxDecoder(out).logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, 320)


def test_runtime_generation_equals_pytorch(exported, artifact):
    model = load_model(artifact).model  # the folder's model: its padding rows masked as in the export
    decoder = OnnxDecoder(exported, threads=1)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ref = model.generate(ids, 12, attention_mask=mask)
    assert torch.equal(decoder.generate(ids, 12, attention_mask=mask), ref)
    for io_binding in (True, False):
        d = OnnxDecoder(exported, io_binding=io_binding)
        sampled = d.generate(ids[1:], 12, temperature=0.9, top_k=20, top_p=0.9,
                             generator=torch.Generator().manual_seed(3))
        want = model.generate(ids[1:], 12, temperature=0.9, top_k=20, top_p=0.9,
                              generator=torch.Generator().manual_seed(3))
        assert torch.equal(sampled, want)


def test_runtime_generation_with_repetition_penalty_equals_pytorch(exported, artifact):
    model = load_model(artifact).model
    ids = torch.tensor([[0, 0, 5, 6, 5, 6], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ref = model.generate(ids, 16, attention_mask=mask, repetition_penalty=1.5)
    assert not torch.equal(ref, model.generate(ids, 16, attention_mask=mask))  # the penalty changes tokens
    for preallocate in (True, False):
        decoder = OnnxDecoder(exported, preallocate=preallocate)
        assert torch.equal(decoder.generate(ids, 16, attention_mask=mask, repetition_penalty=1.5), ref)


def test_runtime_refuses_an_empty_prompt_and_stops_without_a_call_after_the_last_token(exported, monkeypatch):
    decoder = OnnxDecoder(exported, preallocate=False)
    with pytest.raises(ConfigError, match="prompt is empty"):
        decoder.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    calls = []
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a: calls.append(1) or forward(*a))
    assert decoder.generate(torch.tensor([[5, 6]]), 4).shape == (1, 6)
    assert len(calls) == 4  # the prefill and 3 decode steps


def test_perplexity_through_onnx_equals_pytorch(exported, artifact, tokenizer):
    model = load_model(artifact).model
    # Text only ever holds the tokenizer's ids; the embedding's padding rows are never targets.
    tokens = torch.randint(0, tokenizer.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    ref = perplexity(model_logits_fn(model), tokens, max_length=64, stride=32)
    got = perplexity(OnnxDecoder(exported).logits_fn(), tokens, max_length=64, stride=32)
    assert abs(got.perplexity - ref.perplexity) / ref.perplexity < 1e-4
    assert got.tokens == ref.tokens


def test_optimum_loads_export_and_generates_the_same_tokens(exported, capsys):
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(exported, provider="CPUExecutionProvider")
    ids = torch.tensor([[5, 6, 7, 8]])
    out = ort_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                             do_sample=False, min_new_tokens=10, pad_token_id=0, eos_token_id=None)
    ours = OnnxDecoder(exported).generate(ids, 10)
    assert torch.equal(out, ours)


def test_cli_export_and_generate(artifact, tmp_path, capsys):
    out = tmp_path / "cli-onnx"
    assert main(["export", "--model", str(artifact), "--out", str(out), "--no-optimize"]) == 0
    assert read_manifest(out).settings["optimize"] is False
    capsys.readouterr()
    args = ["generate", "--model", str(out), "--prompt", "def value", "--max-new-tokens", "8",
            "--temperature", "0", "--no-stop"]
    assert main(args) == 0
    onnx_text = capsys.readouterr().out
    assert main(args[:2] + [str(artifact)] + args[3:]) == 0
    assert capsys.readouterr().out == onnx_text


def test_fp16_export_validates(artifact, tmp_path):
    out = export_onnx(ExportConfig(model=str(artifact), out=str(tmp_path / "fp16"), dtype="fp16"), log=lambda m: None)
    m = read_manifest(out)
    assert m.metrics["parity_max_logits_rel_diff"] < 0.02
    assert OnnxDecoder(out).dtype == np.float16


def test_ort_int8_baseline(artifact, tmp_path):
    import onnx

    out = export_onnx(ExportConfig(model=str(artifact), out=str(tmp_path / "int8"), ort_int8=True), log=lambda m: None)
    ops = {n.op_type for n in onnx.load(str(out / MODEL_FILE)).graph.node}
    assert "MatMulInteger" in ops
    assert read_manifest(out).metrics["parity_max_logits_rel_diff"] < 0.05


# ---------------------------------------------------------------------------------------
# Bad input


def test_not_an_artifact(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="config.json"):
        export_onnx(ExportConfig(model=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    with pytest.raises(ArtifactError, match="does not exist"):
        export_onnx(ExportConfig(model=str(tmp_path / "missing"), out=str(tmp_path / "o")))


def test_exported_folder_is_not_exportable_again(exported, tmp_path):
    with pytest.raises(ArtifactError, match="already an ONNX export"):
        export_onnx(ExportConfig(model=str(exported), out=str(tmp_path / "o")))


def test_opset_too_old_is_a_clear_error(artifact, tmp_path, capsys):
    with pytest.raises(ConfigError, match="LayerNormalization needs opset 17"):
        ExportConfig(model="m", out="o", opset=13)
    assert main(["export", "--model", str(artifact), "--out", str(tmp_path / "o"), "--opset", "13"]) == 2
    assert "opset 13 is too old" in capsys.readouterr().err


def test_cuda_request_without_gpu_falls_back(exported, monkeypatch):
    import export.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    messages = []
    decoder = OnnxDecoder(exported, device="cuda", log=messages.append)
    assert decoder.device_type == "cpu" and decoder.session.get_providers() == ["CPUExecutionProvider"]
    assert any("no GPU" in m for m in messages)
    with pytest.raises(ConfigError, match="not supported"):
        OnnxDecoder(exported, device="tpu")


def test_prompt_longer_than_positions(exported, capsys):
    decoder = OnnxDecoder(exported)
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        next(decoder.stream(torch.zeros(1, 60, dtype=torch.long), 10))
    assert main(["generate", "--model", str(exported), "--prompt", "def value " * 40, "--max-new-tokens", "5"]) == 2
    assert "positions" in capsys.readouterr().err


def test_incomplete_export_does_not_load(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / ".incomplete").write_text("")
    with pytest.raises(ArtifactError, match="incomplete"):
        OnnxDecoder(copy)


def test_model_file_names_no_directory_of_the_machine_that_made_it(artifact, exported):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(exported / MODEL_FILE), load_external_data=False).metadata_props}
    assert meta["source"] == artifact.name
    assert not any(str(artifact.parent) in value for value in meta.values())
