"""What bench reads from a model folder without running it: how it is measured (its kind),
the bytes a deployment ships, and the parameters of the model it holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...artifacts import read_manifest
from ...errors import ArtifactError
from ...lineage import ancestors
from ..kinds import folder_kind

# folder_kind -> what bench calls the kind (the runtime, for a language model).
BENCH_KINDS = {"model": "pytorch", "quantized": "pytorch-quantized", "onnx": "onnx", "gguf": "gguf",
               "classifier": "classifier"}


def artifact_kind(folder: str | Path) -> str:
    """How bench measures a folder: pytorch, pytorch-quantized, onnx, gguf or classifier.
    ArtifactError for a folder that is not a finished CompactGPT model artifact (no manifest,
    a data folder) or has no tokenizer."""
    folder = Path(folder)
    if read_manifest(folder) is None:  # raises for a missing or unfinished folder
        raise ArtifactError(
            f"{folder} has no manifest.json: bench measures CompactGPT artifacts only (their manifest "
            "names the stage, settings and parent); write it with a compactgpt verb"
        )
    kind = folder_kind(folder)
    if kind == "data":
        raise ArtifactError(f"{folder} is a data folder, not a model; pass it as --data and the models as --models")
    if kind not in BENCH_KINDS:
        raise ArtifactError(f"{folder} is a {kind} folder, not a model bench can run; pass the artifact it was "
                            "made from")
    if not (folder / "tokenizer.json").is_file():
        if kind in ("onnx", "gguf"):
            raise ArtifactError(
                f"{folder} is an {'ONNX' if kind == 'onnx' else 'GGUF'} export without tokenizer.json: prompts and perplexity text cannot be "
                "tokenized; re-export it with `compactgpt export`, which copies the tokenizer"
            )
        raise ArtifactError(f"{folder} has no tokenizer.json; rerun the stage that wrote it")
    return BENCH_KINDS[kind]


def check_models(folders: list[str | Path]) -> list[str]:
    """Each folder's kind (artifact_kind); every bad folder is reported, in one ArtifactError,
    before any measurement."""
    kinds, problems = [], []
    for f in folders:
        try:
            kinds.append(artifact_kind(f))
        except ArtifactError as e:
            problems.append(str(e))
    if problems:
        raise ArtifactError("; ".join(problems))
    return kinds


def file_bytes(folder: str | Path) -> int:
    """Bytes of the files a deployment ships: weights and graphs (manifest, logs and
    checkpoints excluded)."""
    folder = Path(folder)
    names = ("model.safetensors", "model.onnx", "model.onnx.data", "model.gguf")
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of a PyTorch model, a tied one (the LM head sharing the embedding) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _float_parameters(folder: Path) -> int | None:
    """Parameters of a float artifact, read from its safetensors header (tied head counted once)."""
    from safetensors import safe_open

    cfg = folder / "config.json"
    if not (folder / "model.safetensors").is_file() or not cfg.is_file():
        return None
    if "quantization_config" in json.loads(cfg.read_text(encoding="utf-8")):
        return None
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".attn.bias"))


def artifact_parameters(folder: Path, own: int | None) -> int | None:
    """Parameters of the model an artifact holds: `own` (counted on the float model it ran),
    else (a quantized or exported artifact) its nearest float ancestor's, found through the
    manifests."""
    if own:
        return own
    for path, _ in ancestors(folder):
        n = _float_parameters(path)
        if n:
            return n
    return None
