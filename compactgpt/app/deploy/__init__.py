"""Deployment bundles: an ONNX export made ready for where users run it, and checked there.

Targets: `web` (a static page: onnxruntime-web, a JavaScript BPE tokenizer, KV cache, streaming),
`transformers.js` (its file layout), `genai` (onnxruntime-genai) and `mobile` (ORT format and the
operator list of a reduced build). Application layer: it builds on the export stage.
"""

from .bundle import deploy, greedy_reference
from .config import TARGETS, DeployConfig, DeployError

__all__ = ["TARGETS", "DeployConfig", "DeployError", "deploy", "greedy_reference"]
