"""Target `web`: a static folder that generates text in the browser.

    index.html, app.js        the page (app.js: loading, KV-cache generation, streaming)
    sampler.js                one token from the logits, as compactgpt.sampling picks it (Node runs it alone)
    tokenizer.js              the model's byte-level BPE in JavaScript (token for token as tokenizers)
    ort/                      onnxruntime-web's WASM and WebGPU builds, from npm (no CDN)
    model/                    model.onnx (+ .data), tokenizer.json, config.json, deploy.json

`model/deploy.json` is everything the page needs to know about the graph (names, shapes, dtype,
vocabulary), written from export.spec so page and export cannot disagree. The check serves the
folder on 127.0.0.1, opens it in headless Chromium and compares the page's greedy text with ONNX
Runtime's in Python.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from compactgpt.artifacts import read_config, read_manifest
from compactgpt.io import atomic_write_json
from compactgpt.tokenizer import Tokenizer

from . import jslibs
from .bundle import script_json
from .config import DeployConfig, DeployError
from .files import place, tree_bytes

PAGE_FILES = ("index.html", "app.js", "sampler.js", "tokenizer.js")
PAGE_SOURCE = Path(__file__).parent / "web"
DRIVER = Path(__file__).parent / "js" / "drive_page.mjs"
# onnxruntime-web builds: the ES module and the WASM binary it loads. The page imports one: the
# WebGPU build where the browser has a WebGPU adapter, else the WASM build, which runs the WASM
# backend faster than the WebGPU build's own (asyncify) binary does; a browser downloads only
# the build it uses.
ORT_BUILDS = {
    "wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"),
}


def find_chromium() -> str | None:
    """A Chromium or Chrome to run pages headless: COMPACTGPT_CHROMIUM, else the first on PATH."""
    if os.environ.get("COMPACTGPT_CHROMIUM"):
        return os.environ["COMPACTGPT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def runtime_missing() -> str | None:
    if jslibs.find_node() is None:
        return "node is not installed (it drives the browser)"
    if find_chromium() is None:
        return "no Chromium found (apt-get install chromium, or set COMPACTGPT_CHROMIUM to a Chrome binary)"
    return None


def graph_facts(source: Path) -> dict:
    """Names, shapes and dtype of the export's graph as the page feeds it."""
    import onnx

    from export.spec import MODEL_FILE, DecoderSpec

    config = read_config(source)
    spec = DecoderSpec.from_config(config)
    graph = onnx.load(str(source / MODEL_FILE), load_external_data=False).graph
    past_type = next(i.type.tensor_type.elem_type for i in graph.input if i.name == spec.past_key(0))
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(past_type)
    if dtype is None:
        raise DeployError(f"{source} has KV inputs of ONNX type {past_type}; the page feeds float32 or float16")
    tokenizer = Tokenizer.from_folder(source)
    return {
        "n_layer": config.n_layer, "n_head": config.n_head, "head_dim": config.head_dim,
        "n_positions": config.n_positions, "vocab_size": config.vocab_size,
        "n_tokens": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "input_ids": spec.input_ids, "attention_mask": spec.attention_mask, "position_ids": spec.position_ids,
        "logits": spec.logits, "past_names": spec.past_names, "present_names": spec.present_names,
    }


def describe(source: Path) -> str:
    """One line for the page's header: the export's name, shape, block parameters and kind."""
    config = read_config(source)
    manifest = read_manifest(source)
    kind = manifest.extra.get("kind", "onnx") if manifest else "onnx"
    attention = config.n_embd * config.n_head * config.head_dim * 4
    block = config.n_layer * (attention + 2 * config.n_embd * config.n_inner)
    return (f"{source.name}: GPT {config.n_layer}×{config.n_embd}, MLP {config.n_inner} "
            f"({block / 1e6:.1f}M block parameters), {kind}")


def fold_quantized_weights(source: Path, folder: Path, log: Callable[[str], None]) -> list[str] | None:
    """Write the export's graph into `folder` with its MatMulNBits nodes as DequantizeLinear + MatMul
    (export.nbits.dequantize_linear_graph), validated against the export by output name; the
    files written, or None when the graph has no MatMulNBits. Raises DeployError when the two
    graphs disagree beyond the quantized-export tolerance."""
    import onnx

    from export.exporter import save_proto
    from export.nbits import dequantize_linear_graph
    from export.spec import MODEL_FILE

    if not any(n.op_type == "MatMulNBits" for n in onnx.load(str(source / MODEL_FILE), load_external_data=False).graph.node):
        return None
    proto, rewritten = dequantize_linear_graph(onnx.load(str(source / MODEL_FILE)))
    folder.mkdir(parents=True, exist_ok=True)
    files = save_proto(proto, folder, "auto")
    del proto
    difference = graph_difference(source / MODEL_FILE, folder / MODEL_FILE, read_config(source))
    if not difference <= FOLD_RTOL:
        raise DeployError(f"the folded graph's logits differ from the export's by {difference:.3g} of their range "
                          f"(allowed {FOLD_RTOL}); deploy with --no-fold-weights")
    log(f"{rewritten} MatMulNBits weights shipped as DequantizeLinear, folded to float32 by the page "
        f"(logits within {difference:.2g} of the export's range)")
    return files


# The folded graph computes with float activations; an export made at accuracy_level 4 quantizes
# them to int8: the same bound as a quantized export against PyTorch (ExportConfig.quant_rtol).
FOLD_RTOL = 0.05


def graph_difference(reference: Path, candidate: Path, config) -> float:
    """max |logits difference| / max |reference logits| of two decoder graphs on one 12-token
    prompt, read by output name (ONNX Runtime, CPU)."""
    import numpy as np
    import onnxruntime as ort

    from export.spec import DecoderSpec

    spec = DecoderSpec.from_config(config)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # fold, as the page does
    ids = (np.arange(12, dtype=np.int64) * 7919 % min(config.vocab_size, 256))[None, :]
    feeds = {spec.input_ids: ids, spec.attention_mask: np.ones_like(ids), spec.position_ids: np.arange(12)[None, :]}
    feeds.update({n: np.zeros((1, spec.n_head, 0, spec.head_dim), np.float32) for n in spec.past_names})
    ref, got = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run([spec.logits], feeds)[0]
                for p in (reference, candidate))
    finite = np.abs(ref) < 1e30  # masked vocabulary padding
    return float(np.abs(ref - got)[finite].max() / np.abs(ref[finite]).max())


def reference_graph(out: Path, source: Path, config: DeployConfig, scratch: Path) -> Path:
    """The graph whose arithmetic the page follows. onnxruntime-web's WASM MatMulNBits computes
    with float activations whatever the export's accuracy_level, exactly as the folded graph
    does (measured: the same greedy tokens either way); so a quantized export's reference is its
    folded graph: the bundle's own, or one written into `scratch` for a --no-fold-weights bundle."""
    if json.loads((out / "model" / "deploy.json").read_text()).get("fold_quantized_weights"):
        return out / "model"
    if fold_quantized_weights(source, scratch, log=lambda m: None) is None:
        return source
    for name in ("tokenizer.json", "config.json"):
        place(source / name, scratch / name)
    return scratch


def write(source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> tuple[list[str], dict]:
    modules = jslibs.ensure_installed(log)
    facts = graph_facts(source)
    files = []
    for name in PAGE_FILES:
        place(PAGE_SOURCE / name, out / name, link=False)
        files.append(name)
    ort_dist = modules / "onnxruntime-web" / "dist"
    builds = ["wasm", "webgpu"] if config.webgpu else ["wasm"]
    for name in (n for build in builds for n in ORT_BUILDS[build]):
        place(ort_dist / name, out / "ort" / name)
        files.append(f"ort/{name}")
    from export.spec import DATA_FILE, MODEL_FILE

    folded = fold_quantized_weights(source, out / "model", log) if config.fold_weights else None
    graph_files = folded or [name for name in (MODEL_FILE, DATA_FILE) if (source / name).is_file()]
    model_files = graph_files + ["tokenizer.json", "config.json"]
    for name in ([] if folded else graph_files) + ["tokenizer.json", "config.json"]:  # the rest: the export's
        place(source / name, out / "model" / name)
    files += [f"model/{name}" for name in model_files]
    info = {**facts, "model_file": MODEL_FILE, "external_data": next((n for n in graph_files if n != MODEL_FILE), None),
            "ort_modules": {build: f"ort/{ORT_BUILDS[build][0]}" for build in builds},
            "fold_quantized_weights": folded is not None,
            "threads": config.threads, "default_prompt": config.prompt, "description": describe(source),
            "onnxruntime_web": jslibs.package_version(modules, "onnxruntime-web")}
    atomic_write_json(out / "model" / "deploy.json", info)
    files.append("model/deploy.json")
    runtime_bytes = {build: tree_bytes(out, [f"ort/{n}" for n in ORT_BUILDS[build]]) for build in builds}
    metrics = {"bundle_bytes": tree_bytes(out, files),
               "model_bytes": tree_bytes(out, [f"model/{n}" for n in model_files]),
               # what a browser downloads: the page, the model and the one build it uses
               "wasm_download_bytes": tree_bytes(out, [f for f in files if not f.startswith("ort/")])
               + runtime_bytes["wasm"],
               **{f"runtime_{build}_bytes": n for build, n in runtime_bytes.items()},
               "onnxruntime_web": info["onnxruntime_web"]}
    log(f"web bundle: {metrics['bundle_bytes'] / 1e6:.1f} MB (model {metrics['model_bytes'] / 1e6:.1f} MB, "
        f"onnxruntime-web {info['onnxruntime_web']}: {', '.join(builds)} builds); a browser without WebGPU "
        f"downloads {metrics['wasm_download_bytes'] / 1e6:.1f} MB")
    return files, metrics


def run_page(folder: str | Path, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
             repetition_penalty: float = 1.0, threads: int = 2, backend: str = "wasm", no_stop: bool = False,
             timeout: float = 600) -> dict:
    """Serve `folder`, open index.html?prompt=...&temperature=...&repetition_penalty=... in headless
    Chromium and return {"title", "output", "state"} once the page is done (state: the page's
    window.compactgpt, with newIds, prefillMs, stepMs and decodeTokensPerSecond). no_stop: go on
    past <|endoftext|>. Raises DeployError when the page reports an error, or Chromium or node fails."""
    from urllib.parse import urlencode

    from .serve import start_server, url_of

    missing = runtime_missing()
    if missing:
        raise DeployError(f"cannot open the page: {missing}")
    modules = jslibs.ensure_installed()
    server = start_server(folder)
    query = urlencode({"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                       "repetition_penalty": repetition_penalty,
                       "threads": threads, "backend": backend, **({"no_stop": 1} if no_stop else {})})
    try:
        # The driver gives up waiting on the page after `timeout`; a minute more covers Chromium's start.
        page = script_json([jslibs.require_node(), str(DRIVER), str(modules), find_chromium(),
                            f"{url_of(server)}index.html?{query}", str(timeout)], "the browser run", timeout + 60)
    finally:
        server.shutdown()
    if page["title"] != "done":
        raise DeployError(f"the page reported {page['title']!r}")
    return page


def check(out: Path, config: DeployConfig, expected: dict, log: Callable[[str], None]) -> dict:
    from .bundle import same_tokens_or_raise

    page = run_page(out, config.prompt, config.max_new_tokens, threads=config.threads)
    state = page["state"]
    same_tokens_or_raise("the browser", expected, state.get("newIds"), page["output"])
    rate = state.get("decodeTokensPerSecond")
    log(f"the browser generated the same {len(expected['new_ids'])} tokens"
        + (f" ({rate:.1f} tokens/s, {state['backend']}, {state['threads']} threads)" if rate else ""))
    return {"browser_tokens_match": True, "browser_backend": state["backend"], "browser_threads": state["threads"]}
