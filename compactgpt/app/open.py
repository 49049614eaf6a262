"""Opening any language-model folder, in one place, for every verb that runs a model: one
opened model serves scoring (a logits function over token windows) and streaming
generation (`.stream(...)`). A float folder (CompactGPT's or transformers' GPT-2) runs in
PyTorch, a quantized folder through its integer-weight layers (both on the device asked
for), an ONNX export in ONNX Runtime, a GGUF export in llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..artifacts import Manifest, load_model, read_manifest, resolve_model_path
from ..device import resolve_device
from ..errors import ConfigError
from ..tokenizer import Tokenizer
from .kinds import folder_kind


@dataclass
class OpenedModel:
    """A language-model folder opened once: its tokenizer and lineage, a logits function
    (ids (B, T) on the CPU -> logits (B, T, V)), the longest window it accepts, and the
    runner that generates."""

    folder: Path
    kind: str  # a key of compactgpt.artifacts.FOLDER_KINDS
    tokenizer: Tokenizer
    manifest: Manifest | None
    logits_fn: Callable
    n_positions: int
    runner: Any  # has .stream(ids, max_new_tokens, ...): the PyTorch model, or the ONNX decoder
    # Where the runner takes its ids: the PyTorch model's device; the CPU for ONNX Runtime,
    # which copies inputs from host memory whatever its provider.
    device: torch.device

    def stream(self, ids: torch.Tensor, max_new_tokens: int, **sampling) -> Iterator:
        """The runner's stream from `ids` held on any device (prompts are drawn on the CPU),
        moved to where the runner takes them."""
        return self.runner.stream(ids.to(self.device), max_new_tokens, **sampling)


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


def open_model(model: str | Path, threads: int | None = None, device: str | torch.device = "auto",
               onnx_device: str = "cpu") -> OpenedModel:
    """A language-model folder of any kind, opened for scoring and streaming: a PyTorch or
    quantized model on `device`, an ONNX export on ONNX Runtime with `threads` intra-op
    threads on `onnx_device` (cpu | cuda[:N]), a GGUF export in llama.cpp on the CPU with
    `threads`. Raises ArtifactError for a folder that is not a model, ConfigError for a
    classifier, a deployment bundle, a device this machine lacks, or a GGUF export where
    llama-cpp-python is not installed."""
    from ..evaluation import model_logits_fn

    device = resolve_device(device)
    folder, kind = _language_model(model)
    if kind == "onnx":
        from export.runtime import OnnxDecoder

        decoder = OnnxDecoder(folder, threads=threads, device=onnx_device)
        # An export made elsewhere may carry GPT-2's vocab.json + merges.txt instead.
        tokenizer = decoder.tokenizer or Tokenizer.from_folder(folder)
        return OpenedModel(folder, kind, tokenizer, read_manifest(folder), decoder.logits_fn(),
                           decoder.config.n_positions, decoder, torch.device("cpu"))
    if kind == "gguf":
        from export.llamacpp import LlamaCppDecoder

        decoder = LlamaCppDecoder(folder, threads=threads)
        return OpenedModel(folder, kind, decoder.tokenizer, read_manifest(folder), decoder.logits_fn(),
                           decoder.config.n_positions, decoder, torch.device("cpu"))
    loaded = load_pytorch(folder, kind, device)
    net = loaded.model.eval()
    return OpenedModel(folder, kind, loaded.tokenizer, loaded.manifest, model_logits_fn(net, device),
                       net.config.n_positions, net, device)


def open_for_scoring(model: str | Path, threads: int | None = None,
                     device: str | torch.device = "auto") -> OpenedModel:
    """A language-model folder of any kind, ready to be scored (`open_model`): an ONNX export
    on ONNX Runtime's CPU provider whatever `device` says. Raises as `open_model`."""
    return open_model(model, threads, device)


def open_for_streaming(model: str | Path, threads: int | None = None,
                       device: str | torch.device = "auto") -> tuple[Any, Tokenizer, Path]:
    """(model with .stream(ids, max_new_tokens, ...), tokenizer, folder) for generation: an
    ONNX export on ONNX Runtime (its CPU provider unless `device` names a GPU), any other
    model folder in PyTorch on `device`. The stream takes ids on the model's device
    (`compactgpt.device.device_of`). Raises ConfigError for a classifier or a device this
    machine lacks."""
    # auto keeps ONNX Runtime on its CPU provider, as before --device existed.
    onnx_device = "cpu" if device in (None, "auto") else str(resolve_device(device))
    opened = open_model(model, threads, device, onnx_device)
    return opened.runner, opened.tokenizer, opened.folder
