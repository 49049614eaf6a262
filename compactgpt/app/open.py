"""Opening any language-model folder the way a verb needs it, in one place: for scoring
(a logits function over token windows) or for streaming generation (a model with
`.stream(...)`). A float folder (CompactGPT's or transformers' GPT-2) runs in PyTorch, a
quantized folder through its integer-weight layers (both on the device asked for), an ONNX
export in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..artifacts import Manifest, folder_kind, load_model, read_config, read_manifest, resolve_model_path
from ..device import resolve_device
from ..errors import ConfigError
from ..tokenizer import Tokenizer


@dataclass
class ScoringModel:
    """What scoring needs of a folder: its tokenizer and lineage, a logits function
    (ids (B, T) -> logits (B, T, V)) and the longest window it accepts."""

    folder: Path
    kind: str  # a key of compactgpt.artifacts.FOLDER_KINDS
    tokenizer: Tokenizer
    manifest: Manifest | None
    logits_fn: Callable
    n_positions: int


def _language_model(model: str | Path) -> tuple[Path, str]:
    """(folder, kind) of a language-model folder; ConfigError for a classifier."""
    folder = resolve_model_path(model)
    kind = folder_kind(folder)
    if kind == "classifier":
        _refuse_classifier(folder)
    if kind == "deploy":
        manifest = read_manifest(folder)
        parent = manifest.parent["path"] if manifest and manifest.parent else "the export it was made from"
        raise ConfigError(f"{folder} is a deployment bundle ({manifest.extra.get('target')}), run by its own "
                          f"runtime; pass the ONNX export it was made from ({parent}, relative to the bundle)")
    return folder, kind


def load_pytorch(folder: Path, kind: str, device: torch.device) -> Any:
    """A float ("model") or "quantized" folder loaded on `device` (.model, .tokenizer, .manifest)."""
    if kind == "quantized":
        from quantize import load_quantized

        return load_quantized(folder, device=device)
    return load_model(folder, device=device)


def _refuse_classifier(folder: Path) -> None:
    raise ConfigError(f"{folder} is a classifier (it predicts labels, not text); run "
                      f"`compactgpt classify --model {folder} --text ...` instead")


def open_for_scoring(model: str | Path, threads: int | None = None,
                     device: str | torch.device = "auto") -> ScoringModel:
    """A language-model folder of any kind, ready to be scored: a PyTorch or quantized model on
    `device` (its logits function takes ids on the CPU), an ONNX export on ONNX Runtime's CPU
    provider. Raises ArtifactError for a folder that is not a model, ConfigError for a
    classifier or a device this machine lacks."""
    from ..evaluation import model_logits_fn

    device = resolve_device(device)
    folder, kind = _language_model(model)
    if kind == "onnx":
        from export.runtime import OnnxDecoder

        decoder = OnnxDecoder(folder, threads=threads)
        return ScoringModel(folder, kind, Tokenizer.from_folder(folder), read_manifest(folder),
                            decoder.logits_fn(), read_config(folder).n_positions)
    loaded = load_pytorch(folder, kind, device)
    return ScoringModel(folder, kind, loaded.tokenizer, loaded.manifest, model_logits_fn(loaded.model, device),
                        loaded.model.config.n_positions)


def open_for_streaming(model: str | Path, threads: int | None = None,
                       device: str | torch.device = "auto") -> tuple[Any, Tokenizer, Path]:
    """(model with .stream(ids, max_new_tokens, ...), tokenizer, folder) for generation: an
    ONNX export on ONNX Runtime (its CPU provider unless `device` names a GPU), any other
    model folder in PyTorch on `device`. The stream takes ids on the model's device
    (`compactgpt.device.device_of`). Raises ConfigError for a classifier or a device this
    machine lacks."""
    spec = device
    device = resolve_device(device)
    folder, kind = _language_model(model)
    if kind == "onnx":
        from export.runtime import open_decoder

        # auto keeps ONNX Runtime on its CPU provider, as before --device existed.
        onnx_device = "cpu" if spec in (None, "auto") else str(device)
        decoder, tokenizer = open_decoder(folder, threads=threads, device=onnx_device)
        return decoder, tokenizer, folder
    loaded = load_pytorch(folder, kind, device)
    return loaded.model, loaded.tokenizer, folder
