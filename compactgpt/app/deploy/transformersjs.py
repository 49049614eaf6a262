"""Target `transformers.js`: the folder layout transformers.js loads with
`pipeline("text-generation", folder)`.

transformers.js looks for `onnx/model{suffix}.onnx` beside config.json and the tokenizer, the
suffix naming the precision (`_q4` for 4-bit weights, `_quantized` for 8-bit, none for fp32),
and reads which one to take from `transformers.js_config.dtype` in config.json; this target
writes that layout around the export's graph, unchanged. The check runs the pipeline in Node
(onnxruntime-node) and compares its greedy tokens with ONNX Runtime's in Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from compactgpt.artifacts import read_config
from compactgpt.io import atomic_write_json

from . import jslibs
from .bundle import script_json
from .config import DeployConfig, DeployError
from .files import place, tree_bytes

DRIVER = Path(__file__).parent / "js" / "transformers_generate.mjs"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers.js's dtype names -> the file suffix it looks for (its DEFAULT_DTYPE_SUFFIX_MAPPING)
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q8": "_quantized", "q4": "_q4"}


def graph_dtype(model_file: Path) -> str:
    """transformers.js's name for the precision of an export's graph: q4 / q8 for 4- / 8-bit
    MatMulNBits weights, int8 for ONNX Runtime's dynamic int8, fp16 or fp32 otherwise."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return {4: "q4", 8: "q8"}.get(bits, f"q{bits}")
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
            return "int8"
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    return "fp16" if onnx.TensorProto.FLOAT16 in inputs.values() else "fp32"


def runtime_missing() -> str | None:
    return "node is not installed (transformers.js runs in Node)" if jslibs.find_node() is None else None


def _place_graph(source: Path, out: Path, name: str) -> list[str]:
    """onnx/NAME.onnx from the export's model.onnx; external weights move to NAME.onnx_data
    (transformers.js's name for them) and the graph is rewritten to point there."""
    import onnx

    from export.spec import DATA_FILE, MODEL_FILE

    target = out / "onnx" / f"{name}.onnx"
    if not (source / DATA_FILE).is_file():
        place(source / MODEL_FILE, target)
        return [f"onnx/{name}.onnx"]
    proto = onnx.load(str(source / MODEL_FILE), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"{name}.onnx_data"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(target))
    place(source / DATA_FILE, out / "onnx" / f"{name}.onnx_data")
    return [f"onnx/{name}.onnx", f"onnx/{name}.onnx_data"]


def write(source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> tuple[list[str], dict]:
    from export.spec import DATA_FILE, MODEL_FILE

    dtype = graph_dtype(source / MODEL_FILE)
    if dtype not in SUFFIXES:
        raise DeployError(f"{source} holds {dtype} weights, which transformers.js has no file name for; "
                          "export 4- or 8-bit weights")
    files = _place_graph(source, out, f"model{SUFFIXES[dtype]}")
    hf_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    hf_config["transformers.js_config"] = {"dtype": dtype,
                                           "use_external_data_format": (source / DATA_FILE).is_file()}
    atomic_write_json(out / "config.json", hf_config)
    model_config = read_config(source)
    atomic_write_json(out / "generation_config.json", {"bos_token_id": model_config.bos_token_id,
                                                       "eos_token_id": model_config.eos_token_id,
                                                       "max_length": model_config.n_positions})
    for name in TOKENIZER_FILES:
        place(source / name, out / name)
    files += ["config.json", "generation_config.json", *TOKENIZER_FILES]
    log(f"transformers.js layout: {files[0]} (dtype {dtype})")
    return files, {"bundle_bytes": tree_bytes(out, files), "transformersjs_dtype": dtype}


def run_transformersjs(folder: str | Path, prompt: str, max_new_tokens: int, timeout: float = 600) -> dict:
    """{"text", "new_ids"}: greedy generation by transformers.js in Node from the bundle folder.
    Raises DeployError when Node or transformers.js fails."""
    modules = jslibs.ensure_installed()
    return script_json([jslibs.require_node(), str(DRIVER), str(modules), str(Path(folder).resolve()), prompt,
                        str(max_new_tokens)], "transformers.js", timeout)


def check(out: Path, config: DeployConfig, expected: dict, log: Callable[[str], None]) -> dict:
    from .bundle import same_tokens_or_raise

    if not config.prompt:
        raise DeployError("the transformers.js check needs a non-empty --prompt")
    got = run_transformersjs(out, config.prompt, len(expected["new_ids"]) or 1)
    same_tokens_or_raise("transformers.js (model.generate)", expected, got["new_ids"], None)
    same_tokens_or_raise("transformers.js (pipeline)", expected, None, got["text"])
    log(f"transformers.js generated the same {len(expected['new_ids'])} tokens")
    return {"transformersjs_tokens_match": True}
