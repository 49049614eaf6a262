"""`compactgpt deploy --target mobile` and `--target genai`: the bundles' files, the operator list
checked against model.ort, the checks in ONNX Runtime and onnxruntime-genai, and the errors.

onnxruntime-genai lives in a Python of its own: the default suite stands in for it with a fake
that prints a token list (the comparison logic), and a slow test runs the real one when
COMPACTGPT_GENAI_PYTHON or .venv-genai names one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from compactgpt.app.deploy import DeployConfig, DeployError, deploy, genai, greedy_reference, mobile
from compactgpt.artifacts import read_config, read_manifest, save_model
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.tokenizer import train_bpe
from export import ExportConfig, export_onnx
from export.genai import genai_config
from tests.conftest import talkative_gpt

QUIET = dict(log=lambda m: None)
PROMPT = "def main("
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A float model artifact, its export, its export with external weights, and its int4 (RTN)
    export."""
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    root = tmp_path_factory.mktemp("deploy")
    tokenizer = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_model(root / "model", talkative_gpt(0), tokenizer, stage="pretrain", settings={})
    quantize_folder(QuantizeConfig(model=str(root / "model"), out=str(root / "int4"), progress=False,
                                   method=RTNConfig(bits=4, group_size=16)), **QUIET)
    return {
        "model": root / "model",
        "fp32": export_onnx(ExportConfig(model=str(root / "model"), out=str(root / "fp32")), **QUIET),
        "external": export_onnx(ExportConfig(model=str(root / "model"), out=str(root / "external"),
                                             external_data="always"), **QUIET),
        "int4": export_onnx(ExportConfig(model=str(root / "int4"), out=str(root / "int4-onnx")), **QUIET),
    }


@pytest.fixture(scope="module")
def mobile_bundle(exports, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mobile"
    return deploy(DeployConfig(model=str(exports["fp32"]), target="mobile", out=str(out), check="always"), **QUIET)


@pytest.fixture
def no_genai(monkeypatch, tmp_path):
    """No onnxruntime-genai: the variable names a Python that does not exist."""
    monkeypatch.setenv(genai.GENAI_PYTHON_ENV, str(tmp_path / "missing" / "python"))


def fake_genai_python(folder: Path, tokens: list[int]) -> Path:
    """An executable that stands in for a Python with onnxruntime-genai: whatever it is asked
    (the import probe, the generation script), it prints `tokens` as the script would."""
    path = folder / "fake-genai-python"
    path.write_text(f"#!/bin/sh\necho '{json.dumps(tokens)}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_reference_tokens_vary_so_the_checks_can_fail(exports):
    _, new, _ = greedy_reference(exports["fp32"], PROMPT, NEW_TOKENS)
    assert len(new) == NEW_TOKENS and len(set(new)) > NEW_TOKENS // 2


# -- mobile -------------------------------------------------------------------------------------


def test_mobile_bundle_is_model_ort_with_its_operator_list_checked_in_onnx_runtime(mobile_bundle, exports):
    names = {p.name for p in mobile_bundle.iterdir()}
    assert names == {"model.ort", "required_operators.config", "genai_config.json", "config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "manifest.json"}  # no model.onnx, no temp
    manifest = read_manifest(mobile_bundle)
    assert manifest.stage == "deploy" and manifest.extra["target"] == "mobile"
    assert set(manifest.files) == names - {"manifest.json"}
    m = manifest.metrics
    assert m["checked"] and m["ort_tokens_match"] and m["check_tokens"] == NEW_TOKENS
    assert m["ort_max_logits_diff"] < 1e-4  # the same optimized graph as ONNX Runtime's on model.onnx
    assert m["ort_bytes"] == (mobile_bundle / "model.ort").stat().st_size
    settings = json.loads((mobile_bundle / "genai_config.json").read_text())
    assert settings["model"]["decoder"]["filename"] == "model.ort"
    ops = mobile.check_operator_config(mobile_bundle / "model.ort", mobile_bundle / "required_operators.config")
    assert {("com.microsoft", 1, "MultiHeadAttention"), ("com.microsoft", 1, "SkipLayerNormalization"),
            ("ai.onnx", 13, "MatMul")} <= ops and m["operators"] == len(ops)
    text = (mobile_bundle / "required_operators.config").read_text()
    assert ".ort-conversion" not in text and "--include_ops_by_config" in text  # no temporary path recorded


def doctored(bundle: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    shutil.copyfile(bundle / "model.ort", tmp_path / "model.ort")
    lines = (bundle / "required_operators.config").read_text().splitlines()
    (tmp_path / "ops.config").write_text("\n".join(edit(lines)) + "\n")
    return tmp_path / "model.ort", tmp_path / "ops.config"


def drop_op(lines, op):
    return [ln.replace(f"{op},", "").replace(f",{op}", "") for ln in lines]


@pytest.mark.parametrize("edit,message", [
    (lambda ls: drop_op(ls, "MultiHeadAttention"), "lacks com.microsoft;1;MultiHeadAttention, which model.ort uses"),
    (lambda ls: ls + ["ai.onnx;14;Mul"], "lists ai.onnx;14;Mul, which model.ort does not use"),
    (lambda ls: [ln.replace(";Range", ";Range2") for ln in ls],
     "lacks ai.onnx;11;Range, which .*; lists ai.onnx;11;Range2, which"),
    (lambda ls: ls + ["ai.onnx;Add"], "is not an operator config"),
], ids=["missing", "extra", "renamed", "malformed"])
def test_operator_check_names_what_the_list_and_the_model_disagree_on(mobile_bundle, tmp_path, edit, message):
    with pytest.raises(DeployError, match=message) as e:
        mobile.check_operator_config(*doctored(mobile_bundle, tmp_path, edit))
    assert "\n" not in str(e.value)


def test_operator_check_reads_the_format_not_the_text(mobile_bundle, tmp_path):
    """One operator per line, in another order, with comments: the same list to a reduced build."""
    def one_per_line(lines):
        entries = [(d, v, op) for ln in lines if ln and not ln.startswith("#")
                   for d, v, ops in [ln.split(";")] for op in ops.split(",")]
        return ["# hand-written"] + [f"{d};{v};{op}" for d, v, op in reversed(entries)]
    ort_model, ops_config = doctored(mobile_bundle, tmp_path, one_per_line)
    assert mobile.check_operator_config(ort_model, ops_config) == mobile.model_operators(ort_model)


def test_mobile_check_fails_on_other_tokens(mobile_bundle, exports):
    prompt_ids, new, text = greedy_reference(exports["fp32"], PROMPT, NEW_TOKENS)
    wrong = new[:5] + [(new[5] + 1) % 280] + new[6:]
    config = DeployConfig(model=str(exports["fp32"]), target="mobile", out=str(mobile_bundle))
    with pytest.raises(DeployError, match="other tokens .* from token 5 on"):
        mobile.check(mobile_bundle, config, {"prompt_ids": prompt_ids, "new_ids": wrong, "text": text}, **QUIET)


def test_int4_export_deploys_to_mobile(exports, tmp_path):
    out = deploy(DeployConfig(model=str(exports["int4"]), target="mobile", out=str(tmp_path / "b"), check="always"),
                 **QUIET)
    m = read_manifest(out).metrics
    assert m["ort_tokens_match"] and m["ort_max_logits_diff"] < 1e-4
    assert "MatMulNBits" in (out / "required_operators.config").read_text()


def test_fp16_export_deploys_to_mobile_with_a_note_on_its_size(exports, tmp_path):
    """ONNX Runtime converts fp16 graphs for its CPU provider by computing in fp32 (FastGelu
    becomes Tanh/Mul, fp32 weight copies are folded in): it works, but model.ort grows."""
    source = export_onnx(ExportConfig(model=str(exports["model"]), out=str(tmp_path / "fp16"), dtype="fp16"), **QUIET)
    messages = []
    out = deploy(DeployConfig(model=str(source), target="mobile", out=str(tmp_path / "b"), check="always"),
                 log=messages.append)
    m = read_manifest(out).metrics
    assert m["ort_tokens_match"] and m["ort_bytes"] > 1.5 * m["onnx_bytes"]
    assert any(msg.startswith("note: model.ort is") for msg in messages)


def test_mobile_conversion_failure_is_one_line_deploy_error(exports, tmp_path):
    """A graph ONNX Runtime's CPU provider cannot run (an operator it does not know)."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "odd-export"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(exports["fp32"] / name, folder / name)
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input_ids"], ["logits"], domain="example.odd")], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])])
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("example.odd", 1)])
    onnx.save_model(model, str(folder / "model.onnx"))
    with pytest.raises(DeployError, match="ONNX Runtime could not convert .*NoSuchOp") as e:
        deploy(DeployConfig(model=str(folder), target="mobile", out=str(tmp_path / "b"), check="never"), **QUIET)
    assert "\n" not in str(e.value)


def test_mobile_refuses_an_export_over_the_ort_format_limit(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(mobile, "ORT_FORMAT_MAX_BYTES", 1000)  # the real limit is 2 GiB
    with pytest.raises(DeployError, match="limited to 2 GiB .*--target genai"):
        deploy(DeployConfig(model=str(exports["fp32"]), target="mobile", out=str(tmp_path / "b"), check="never"),
               **QUIET)


# -- genai --------------------------------------------------------------------------------------


def test_genai_bundle_links_the_graph_and_regenerates_genai_config(exports, tmp_path, no_genai):
    source = exports["external"]
    out = deploy(DeployConfig(model=str(source), target="genai", out=str(tmp_path / "b"), check="never"), **QUIET)
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.onnx.data", "genai_config.json", "config.json",
                                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                              "manifest.json"}
    assert os.path.samefile(out / "model.onnx.data", source / "model.onnx.data")  # hard-linked, not copied
    assert json.loads((out / "genai_config.json").read_text()) == genai_config(read_config(source))
    manifest = read_manifest(out)
    assert manifest.stage == "deploy" and manifest.metrics["checked"] is False
    graph_bytes = sum((source / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
    assert manifest.metrics["model_bytes"] == graph_bytes


def test_genai_check_always_without_onnxruntime_genai_is_refused_before_writing(exports, tmp_path, no_genai):
    out = tmp_path / "b"
    with pytest.raises(DeployError, match="COMPACTGPT_GENAI_PYTHON=.* does not exist.*pip install onnxruntime-genai"):
        deploy(DeployConfig(model=str(exports["fp32"]), target="genai", out=str(out), check="always"), **QUIET)
    assert not out.exists()
    messages = []
    deploy(DeployConfig(model=str(exports["fp32"]), target="genai", out=str(out)), log=messages.append)  # auto
    assert read_manifest(out).metrics["checked"] is False
    assert any(m.startswith("not checked: COMPACTGPT_GENAI_PYTHON") for m in messages)


def test_genai_check_compares_tokens_up_to_the_end_of_text(exports, tmp_path, monkeypatch, no_genai):
    out = deploy(DeployConfig(model=str(exports["fp32"]), target="genai", out=str(tmp_path / "b"), check="never"),
                 **QUIET)
    prompt_ids, new, text = greedy_reference(exports["fp32"], PROMPT, NEW_TOKENS)
    expected = {"prompt_ids": prompt_ids, "new_ids": new[:10], "text": text}  # as if it stopped at <|endoftext|>
    config = DeployConfig(model=str(exports["fp32"]), target="genai", out=str(out))
    eot = 0  # the test tokenizer's <|endoftext|>, also config.json's eos
    monkeypatch.setenv(genai.GENAI_PYTHON_ENV, str(fake_genai_python(tmp_path, new[:10] + [eot] + new[10:13])))
    assert genai.runtime_missing() is None
    assert genai.check(out, config, expected, **QUIET) == {"genai_tokens_match": True}
    monkeypatch.setenv(genai.GENAI_PYTHON_ENV, str(fake_genai_python(tmp_path, new[:12])))  # ran past it
    with pytest.raises(DeployError, match="onnxruntime-genai generated other tokens"):
        genai.check(out, config, expected, **QUIET)


def real_genai_python() -> str | None:
    root = Path(__file__).resolve().parents[2]
    named = os.environ.get(genai.GENAI_PYTHON_ENV) or str(root / ".venv-genai" / "bin" / "python")
    return named if Path(named).is_file() else None


@pytest.mark.slow
@pytest.mark.parametrize("target", ["genai", "mobile"])
@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_onnxruntime_genai_generates_what_the_export_generates(exports, tmp_path, monkeypatch, target, kind):
    python = real_genai_python()
    if python is None:
        pytest.skip("no Python with onnxruntime-genai (set COMPACTGPT_GENAI_PYTHON)")
    monkeypatch.setenv(genai.GENAI_PYTHON_ENV, python)
    if genai.runtime_missing():
        pytest.skip(genai.runtime_missing())
    out = deploy(DeployConfig(model=str(exports[kind]), target=target, out=str(tmp_path / "b"), check="always"),
                 **QUIET)
    assert read_manifest(out).metrics["genai_tokens_match"] is True


# -- errors of deploy itself --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["genai", "mobile"])
def test_deploy_refuses_a_folder_that_is_not_an_onnx_export(exports, tmp_path, target):
    with pytest.raises(ArtifactError, match="is not an ONNX export; export it first"):
        deploy(DeployConfig(model=str(exports["model"]), target=target, out=str(tmp_path / "b")), **QUIET)


@pytest.mark.parametrize("target", ["genai", "mobile"])
def test_deploy_refuses_to_write_into_the_export(exports, target, no_genai):
    before = sorted(p.name for p in exports["fp32"].iterdir())
    with pytest.raises(ConfigError, match="--out must differ from --model"):
        deploy(DeployConfig(model=str(exports["fp32"]), target=target, out=str(exports["fp32"]), check="never"),
               **QUIET)
    assert sorted(p.name for p in exports["fp32"].iterdir()) == before
