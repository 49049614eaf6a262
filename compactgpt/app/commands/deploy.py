"""`compactgpt deploy`: one flag per DeployConfig field; the bundle written and checked by
compactgpt.app.deploy."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Make an export ready for where it runs, and check it there: --target web writes a static page "
    "that generates in the browser (onnxruntime-web, WASM threads or WebGPU, the model's BPE tokenizer in "
    "JavaScript; serve it with `python -m compactgpt.app.deploy.serve DIR`); transformers.js writes the "
    "layout pipeline('text-generation', DIR) loads; genai a folder onnxruntime-genai runs; mobile model.ort "
    "and the operator list of a reduced ONNX Runtime build; llama.cpp takes a GGUF export (compactgpt export "
    "--format gguf) and writes model.gguf with a README of the llama.cpp commands that run it. The check "
    "runs the bundle in its runtime and compares its greedy tokens with ONNX Runtime's in Python (llama.cpp: "
    "with PyTorch's on the model the GGUF came from). The JavaScript libraries come from npm once (node and "
    "npm needed for web and transformers.js)."
)


def add_deploy_args(p: argparse.ArgumentParser) -> None:
    """The flags of `compactgpt deploy`: DeployConfig's fields, help text from the fields."""
    from ...config import add_config_args
    from ..deploy.config import DeployConfig

    p.description = DESCRIPTION
    add_config_args(p, DeployConfig, show_defaults=True)


def run_deploy(args: argparse.Namespace) -> None:
    """Write the bundle the flags name and print its folder."""
    from ...config import given_args
    from ..deploy import DeployConfig, deploy

    print(deploy(DeployConfig(**given_args(args, DeployConfig))))
