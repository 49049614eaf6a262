"""Opening any language-model folder the way a verb needs it, in one place: for scoring
(a logits function over token windows) or for streaming generation (a model with
`.stream(...)`). A float folder (CompactGPT's or transformers' GPT-2) runs in PyTorch, a
quantized folder through its integer-weight layers, an ONNX export in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..artifacts import Manifest, folder_kind, load_model, read_config, read_manifest, resolve_model_path
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


def _refuse_classifier(folder: Path) -> None:
    raise ConfigError(f"{folder} is a classifier (it predicts labels, not text); run "
                      f"`compactgpt classify --model {folder} --text ...` instead")


def open_for_scoring(model: str | Path, threads: int | None = None) -> ScoringModel:
    """A language-model folder of any kind, ready to be scored. Raises ArtifactError for a
    folder that is not a model, ConfigError for a classifier."""
    from ..evaluation import model_logits_fn

    folder = resolve_model_path(model)
    kind = folder_kind(folder)
    if kind == "classifier":
        _refuse_classifier(folder)
    if kind == "onnx":
        from export.runtime import OnnxDecoder

        decoder = OnnxDecoder(folder, threads=threads)
        return ScoringModel(folder, kind, Tokenizer.from_folder(folder), read_manifest(folder),
                            decoder.logits_fn(), read_config(folder).n_positions)
    if kind == "quantized":
        from quantize import load_quantized

        loaded: Any = load_quantized(folder)
    else:
        loaded = load_model(folder)
    return ScoringModel(folder, kind, loaded.tokenizer, loaded.manifest, model_logits_fn(loaded.model),
                        loaded.model.config.n_positions)


def open_for_streaming(model: str | Path, threads: int | None = None, device: str = "cpu") -> tuple[Any, Tokenizer, Path]:
    """(model with .stream(ids, max_new_tokens, ...), tokenizer, folder) for generation: an
    ONNX export on ONNX Runtime, any other model folder in PyTorch."""
    folder = resolve_model_path(model)
    kind = folder_kind(folder)
    if kind == "classifier":
        _refuse_classifier(folder)
    if kind == "onnx":
        from export.runtime import open_decoder

        decoder, tokenizer = open_decoder(folder, threads=threads, device=device)
        return decoder, tokenizer, folder
    if kind == "quantized":
        from quantize import load_quantized

        loaded: Any = load_quantized(folder)
    else:
        loaded = load_model(folder, device=device)
    return loaded.model, loaded.tokenizer, folder
