"""The web bundle in headless Chromium and the transformers.js layout in Node, against
`compactgpt generate --temperature 0` on the same ONNX folder, for a trained model's fp32 and
int4 exports.

Marked `browser`: run with `make test-browser` (or `pytest -m browser` once the JavaScript
libraries are installed: `python -m compactgpt.app.deploy.jslibs`). The tests install nothing;
they skip when node, Chromium or the libraries are absent.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from compactgpt.app.cli import main
from compactgpt.app.deploy import DeployConfig, DeployError, deploy, greedy_reference
from compactgpt.app.deploy import jslibs, web
from compactgpt.app.deploy.transformersjs import run_transformersjs
from compactgpt.pretrain import config_from_preset, pretrain
from export import ExportConfig, export_onnx
from quantize import QuantizeConfig, RTNConfig, quantize_folder

pytestmark = pytest.mark.browser

PROMPT = "def value_3(self, index):\n    "
NEW_TOKENS = 40
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module", autouse=True)
def runtimes():
    if web.runtime_missing():
        pytest.skip(web.runtime_missing())
    if jslibs.node_modules() is None:
        pytest.skip("JavaScript libraries not installed: python -m compactgpt.app.deploy.jslibs")


@pytest.fixture(scope="module")
def exports(data_dir, tmp_path_factory):
    """ONNX exports of a small model trained on the test corpus: fp32, fp16, int8 and int4 (RTN, g16:
    MatMulNBits) and ONNX Runtime's dynamic int8 (MatMulInteger)."""
    root = tmp_path_factory.mktemp("browser")
    settings = dict(data=str(data_dir), out=str(root / "teacher"), n_positions=128, block_size=64, batch_size=8,
                    max_steps=150, warmup_steps=10, eval_interval=150, checkpoint_interval=1000, log_interval=50,
                    eval_batches=2, dropout=0.0)
    pretrain(config_from_preset("tiny", **settings, progress=False), **QUIET)
    for bits in (4, 8):
        quantize_folder(QuantizeConfig(model=str(root / "teacher"), out=str(root / f"int{bits}"),
                                       method=RTNConfig(bits=bits, group_size=16), progress=False), **QUIET)
    # Embeddings quantized too: the lookup reads the head's codes, the position table is float16.
    for bits, group in ((4, 16), (8, 0)):
        method = RTNConfig(bits=bits, group_size=group, include_embeddings=True)
        quantize_folder(QuantizeConfig(model=str(root / "teacher"), out=str(root / f"int{bits}-emb"), method=method,
                                       progress=False), **QUIET)
    teacher = str(root / "teacher")
    exports = {name: export_onnx(ExportConfig(out=str(root / f"{name}-onnx"), **settings), **QUIET)
               for name, settings in {"fp32": dict(model=teacher), "int4": dict(model=str(root / "int4")),
                                      "int4-a0": dict(model=str(root / "int4"), accuracy_level=0),
                                      "int8": dict(model=str(root / "int8")), "fp16": dict(model=teacher, dtype="fp16"),
                                      "ort-int8": dict(model=teacher, ort_int8=True),
                                      "int4-emb-shared": dict(model=str(root / "int4-emb"), kv_cache="shared"),
                                      "int8-emb-dynamic": dict(model=str(root / "int8-emb"), kv_cache="shared",
                                                               int8_kernel="dynamic")}.items()}
    return exports


def cli_generate(folder, prompt: str, n: int, *flags: str) -> str:
    """The continuation `compactgpt generate --temperature 0 [flags]` prints (it echoes the prompt first)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", str(n),
                     "--temperature", "0", *flags]) == 0
    text = stdout.getvalue()
    assert text.startswith(prompt) and text.endswith("\n")
    return text[len(prompt):-1]


# int4-a0: an int4 export with float activations (accuracy_level 0), the arithmetic of onnxruntime-web's
# WASM kernels, run as folded weights (the default) and as MatMulNBits (--no-fold-weights).
@pytest.mark.parametrize("kind,fold", [("fp32", True), ("int4-a0", True), ("int4-a0", False)])
def test_browser_greedy_text_equals_compactgpt_generate(exports, tmp_path, kind, fold):
    bundle = deploy(DeployConfig(model=str(exports[kind]), target="web", out=str(tmp_path / "web"), check="always",
                                 prompt=PROMPT, max_new_tokens=NEW_TOKENS, fold_weights=fold), **QUIET)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["metrics"]["browser_tokens_match"] is True

    page = web.run_page(bundle, PROMPT, NEW_TOKENS, threads=2)
    expected = cli_generate(exports[kind], PROMPT, NEW_TOKENS)
    assert len(page["state"]["newIds"]) > 10, "a trained model should write more than a few tokens here"
    assert page["output"] == expected
    assert page["state"]["newIds"] == greedy_reference(exports[kind], PROMPT, NEW_TOKENS)[1]
    assert page["state"]["backend"] == "wasm" and page["state"]["threads"] == 2  # served cross-origin isolated
    assert page["state"]["decodeTokensPerSecond"] > 0


def test_browser_samples_and_reports_bad_settings(exports, tmp_path):
    bundle = deploy(DeployConfig(model=str(exports["fp32"]), target="web", out=str(tmp_path / "web"), check="never",
                                 webgpu=False), **QUIET)
    sampled = web.run_page(bundle, PROMPT, 20, temperature=0.9, threads=1)
    assert 0 < len(sampled["state"]["newIds"]) <= 20
    greedy = greedy_reference(exports["fp32"], PROMPT, 20)[1]
    assert sampled["state"]["newIds"] != greedy  # temperature 0.9 on a small model leaves the greedy path
    with pytest.raises(DeployError, match="max_new_tokens"):
        web.run_page(bundle, PROMPT, 0)


def test_browser_repetition_penalty_gives_the_tokens_python_gives(exports, tmp_path):
    bundle = deploy(DeployConfig(model=str(exports["fp32"]), target="web", out=str(tmp_path / "web"), check="never",
                                 webgpu=False), **QUIET)
    page = web.run_page(bundle, PROMPT, NEW_TOKENS, repetition_penalty=1.3, threads=1)
    expected = cli_generate(exports["fp32"], PROMPT, NEW_TOKENS, "--repetition-penalty", "1.3")
    assert page["output"] == expected
    assert expected != cli_generate(exports["fp32"], PROMPT, NEW_TOKENS)  # the penalty changed the text
    with pytest.raises(DeployError, match="repetition_penalty"):
        web.run_page(bundle, PROMPT, 5, repetition_penalty=0)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_transformers_js_generates_the_same_greedy_tokens(exports, tmp_path, kind):
    bundle = deploy(DeployConfig(model=str(exports[kind]), target="transformers.js", out=str(tmp_path / "tjs"),
                                 check="always", prompt=PROMPT, max_new_tokens=NEW_TOKENS), **QUIET)
    got = run_transformersjs(bundle, PROMPT, NEW_TOKENS)
    assert got["text"] == cli_generate(exports[kind], PROMPT, NEW_TOKENS)
    assert got["new_ids"] == greedy_reference(exports[kind], PROMPT, NEW_TOKENS)[1]
    expected_file = {"fp32": "onnx/model.onnx", "int4": "onnx/model_q4.onnx"}[kind]
    assert (bundle / expected_file).is_file()


@pytest.mark.parametrize("kind", ["fp32", "int4-a0"])
def test_webgpu_backend_generates_the_same_greedy_text(exports, tmp_path, kind):
    """WebGPU where the browser has it (headless Chromium offers a software adapter, which the page
    takes only when asked: backend=webgpu)."""
    bundle = deploy(DeployConfig(model=str(exports[kind]), target="web", out=str(tmp_path / "web"), check="never"),
                    **QUIET)
    try:
        page = web.run_page(bundle, PROMPT, NEW_TOKENS, backend="webgpu", timeout=300)
    except DeployError as e:
        if "no WebGPU adapter" in str(e):
            pytest.skip("this Chromium has no WebGPU adapter")
        raise
    assert page["state"]["backend"] == "webgpu"
    assert page["output"] == cli_generate(exports[kind], PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("kind,fold", [("int4", True), ("int4", False), ("int8", True), ("fp16", True),
                                       ("ort-int8", True), ("int4-emb-shared", True), ("int4-emb-shared", False),
                                       ("int8-emb-dynamic", True)])
def test_every_export_kind_runs_in_the_browser(exports, tmp_path, kind, fold):
    """check="always": the page's greedy tokens equal ONNX Runtime's in Python on the graph whose
    arithmetic the page follows (for quantized exports: folded weights, float activations)."""
    bundle = deploy(DeployConfig(model=str(exports[kind]), target="web", out=str(tmp_path / "web"), check="always",
                                 prompt=PROMPT, max_new_tokens=NEW_TOKENS, webgpu=False, fold_weights=fold), **QUIET)
    metrics = json.loads((bundle / "manifest.json").read_text())["metrics"]
    assert metrics["browser_tokens_match"] is True and metrics["check_tokens"] > 10
