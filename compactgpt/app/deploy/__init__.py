"""Deployment bundles: an export made ready for where users run it, and checked there.

Targets of an ONNX export: `web` (a static page: onnxruntime-web, a JavaScript BPE tokenizer, KV
cache, streaming), `transformers.js` (its file layout), `genai` (onnxruntime-genai) and `mobile`
(ORT format and the operator list of a reduced build); of a GGUF export: `llama.cpp` (model.gguf
and the commands that run it). Application layer: it builds on the export stage.
"""

from compactgpt.artifacts import register_folder_kind

from .bundle import deploy, greedy_reference
from .config import TARGETS, DeployConfig, DeployError

# A bundle may hold a model.onnx or a config.json of its own layout: its manifest says what it is.
register_folder_kind("deploy", "a bundle of an export for one runtime (compactgpt deploy)",
                     lambda files: files.stage == "deploy", rank=5, marker="deploy manifest")

__all__ = ["TARGETS", "DeployConfig", "DeployError", "deploy", "greedy_reference"]
