"""The web and transformers.js bundles' files, without a browser or the network: the JavaScript
libraries are stood in for by a fake install (COMPACTGPT_JS_DIR), so these run in the default
suite; tests/app/test_deploy_browser.py runs the real ones."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from compactgpt.app.cli import main
from compactgpt.app.deploy import DeployConfig, DeployError, deploy, jslibs, web
from compactgpt.app.deploy.serve import start_server, url_of
from compactgpt.app.deploy.transformersjs import graph_dtype
from compactgpt.app.open import open_for_scoring
from compactgpt.artifacts import folder_kind, read_manifest, save_model
from compactgpt.errors import ConfigError
from compactgpt.tokenizer import Tokenizer
from export import ExportConfig, export_onnx
from export.spec import DecoderSpec
from quantize import QuantizeConfig, RTNConfig, quantize_folder
from tests.conftest import random_gpt

QUIET = dict(log=lambda m: None)


@pytest.fixture
def fake_js(tmp_path, monkeypatch):
    """An installed-looking node_modules with placeholder onnxruntime-web files."""
    monkeypatch.setenv("COMPACTGPT_JS_DIR", str(tmp_path / "js"))
    dist = jslibs.installed_dir() / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for build in web.ORT_BUILDS.values():
        for name in build:
            (dist / name).write_text(f"// {name}\n")
    (dist.parent / "package.json").write_text(json.dumps({"version": "1.30.0"}))
    (jslibs.installed_dir() / ".complete").write_text("test\n")
    return dist


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from compactgpt.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("exports")
    tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_model(root / "m", random_gpt(0), tok, stage="pretrain", settings={})
    for bits in (4, 8):
        quantize_folder(QuantizeConfig(model=str(root / "m"), out=str(root / f"q{bits}"), progress=False,
                                       method=RTNConfig(bits=bits, group_size=16)), **QUIET)
    return {"fp32": export_onnx(ExportConfig(model=str(root / "m"), out=str(root / "fp32")), **QUIET),
            "int4": export_onnx(ExportConfig(model=str(root / "q4"), out=str(root / "int4")), **QUIET),
            "int8": export_onnx(ExportConfig(model=str(root / "q8"), out=str(root / "int8")), **QUIET),
            "ort-int8": export_onnx(ExportConfig(model=str(root / "m"), out=str(root / "ortint8"), ort_int8=True),
                                    **QUIET),
            "external": export_onnx(ExportConfig(model=str(root / "m"), out=str(root / "ext"),
                                                 external_data="always"), **QUIET)}


def test_web_bundle_holds_the_page_the_runtime_and_what_the_page_must_know(exports, fake_js, tmp_path):
    out = deploy(DeployConfig(model=str(exports["fp32"]), target="web", out=str(tmp_path / "web"), check="never"),
                 **QUIET)
    manifest = read_manifest(out)
    assert manifest.stage == "deploy" and manifest.extra["target"] == "web" and manifest.metrics["checked"] is False
    assert manifest.parent["path"].endswith("fp32") and not manifest.parent["path"].startswith("/")
    for name in ("index.html", "app.js", "tokenizer.js", "model/model.onnx", "model/tokenizer.json",
                 "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.wasm", "ort/ort.webgpu.min.mjs"):
        assert name in manifest.files, name
    info = json.loads((out / "model" / "deploy.json").read_text())
    spec = DecoderSpec(n_layer=2, n_head=4, head_dim=8, vocab_size=320)
    assert info["past_names"] == spec.past_names and info["present_names"] == spec.present_names
    tok = Tokenizer.from_folder(exports["fp32"])
    assert (info["n_tokens"], info["eot_id"], info["vocab_size"], info["dtype"]) == (tok.vocab_size, tok.eot_id, 320,
                                                                                     "float32")
    assert info["ort_modules"] == {"wasm": "ort/ort.wasm.min.mjs", "webgpu": "ort/ort.webgpu.min.mjs"}
    # The page's sources are copies (users edit them), never links to the installed package's files.
    assert not any((out / name).samefile(web.PAGE_SOURCE / name) for name in web.PAGE_FILES)
    assert folder_kind(out) == "deploy"
    with pytest.raises(ConfigError, match="deployment bundle"):
        open_for_scoring(out)


def test_no_webgpu_ships_the_wasm_build_only(exports, fake_js, tmp_path):
    out = deploy(DeployConfig(model=str(exports["int4"]), target="web", out=str(tmp_path / "web"), check="never",
                              webgpu=False), **QUIET)
    assert sorted(p.name for p in (out / "ort").iterdir()) == sorted(web.ORT_BUILDS["wasm"])
    assert json.loads((out / "model" / "deploy.json").read_text())["ort_modules"] == {"wasm": "ort/ort.wasm.min.mjs"}


def test_missing_node_or_npm_is_a_one_line_error(exports, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPACTGPT_JS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    code = main(["deploy", "--model", str(exports["fp32"]), "--target", "web", "--out", str(tmp_path / "web")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "node is not installed" in err and "apt-get install nodejs" in err
    assert not (tmp_path / "web" / "manifest.json").exists()


def test_check_always_without_a_browser_is_refused_before_writing(exports, fake_js, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTGPT_CHROMIUM", "")
    monkeypatch.setattr(web, "find_chromium", lambda: None)
    with pytest.raises(DeployError, match="Chromium"):
        deploy(DeployConfig(model=str(exports["fp32"]), target="web", out=str(tmp_path / "web"), check="always"),
               **QUIET)
    assert not (tmp_path / "web").exists()


@pytest.mark.parametrize("kind,dtype,graph", [("fp32", "fp32", "onnx/model.onnx"), ("int4", "q4", "onnx/model_q4.onnx"),
                                              ("int8", "q8", "onnx/model_quantized.onnx"),
                                              ("ort-int8", "int8", "onnx/model_int8.onnx")])
def test_transformers_js_layout_names_the_graph_by_its_precision(exports, tmp_path, kind, dtype, graph):
    assert graph_dtype(exports[kind] / "model.onnx") == dtype
    out = deploy(DeployConfig(model=str(exports[kind]), target="transformers.js", out=str(tmp_path / "tjs"),
                              check="never"), **QUIET)
    assert (out / graph).is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"]["dtype"] == dtype and config["model_type"] == "gpt2"


def test_transformers_js_layout_moves_external_weights_to_its_own_name(exports, tmp_path):
    import onnxruntime as ort

    out = deploy(DeployConfig(model=str(exports["external"]), target="transformers.js", out=str(tmp_path / "tjs"),
                              check="never"), **QUIET)
    assert (out / "onnx" / "model.onnx_data").is_file()
    assert json.loads((out / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    # The rewritten graph finds its weights under the new name and computes what the export does.
    feeds = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.array([[0, 1, 2]])}
    feeds.update({n: np.zeros((1, 4, 0, 8), np.float32) for n in DecoderSpec(2, 4, 8, 320).past_names})
    ours = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(exports["external"] / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(ours.run(["logits"], feeds)[0], theirs.run(["logits"], feeds)[0])


def test_server_isolates_the_page_and_types_its_modules(tmp_path):
    (tmp_path / "a.mjs").write_text("export {};")
    (tmp_path / "b.wasm").write_bytes(b"\0asm")
    server = start_server(tmp_path)
    try:
        for name, mime in (("a.mjs", "text/javascript"), ("b.wasm", "application/wasm")):
            with urllib.request.urlopen(url_of(server) + name) as response:
                assert response.headers["Content-Type"] == mime
                assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    finally:
        server.shutdown()


def test_quantized_weights_ship_as_dequantize_linear_unless_asked_not_to(exports, fake_js, tmp_path):
    import onnx

    folded = deploy(DeployConfig(model=str(exports["int4"]), target="web", out=str(tmp_path / "folded"),
                                 check="never"), **QUIET)
    ops = {n.op_type for n in onnx.load(str(folded / "model" / "model.onnx")).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    assert json.loads((folded / "model" / "deploy.json").read_text())["fold_quantized_weights"] is True
    assert web.reference_graph(folded, exports["int4"], None, tmp_path / "scratch") == folded / "model"

    kept = deploy(DeployConfig(model=str(exports["int4"]), target="web", out=str(tmp_path / "kept"), check="never",
                               fold_weights=False), **QUIET)
    assert (kept / "model" / "model.onnx").samefile(exports["int4"] / "model.onnx")
    assert json.loads((kept / "model" / "deploy.json").read_text())["fold_quantized_weights"] is False
    # The page's WASM MatMulNBits computes with float activations: its reference is the folded graph.
    scratch = tmp_path / "scratch2"
    scratch.mkdir()
    assert web.reference_graph(kept, exports["int4"], None, scratch) == scratch
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(scratch / "model.onnx")).graph.node}
    assert web.reference_graph(kept, exports["fp32"], None, scratch) == exports["fp32"]
