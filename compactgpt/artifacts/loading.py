"""Model folders saved and loaded whole: weights, config, tokenizer and manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ArtifactError, ConfigError
from ..io import atomic_write, atomic_write_json, sha256_file
from ..model import GPT, from_hf_state_dict
from ..tokenizer import Tokenizer
from .hf_config import config_json, hf_config_dict, read_config
from .manifest import WEIGHTS, Manifest, read_manifest, resolved_parent
from .weights import check_float_weights, read_weights, weights_file, write_weights
from .writing import begin_write, finish_write


@dataclass
class LoadedModel:
    """A model folder loaded: the model, its tokenizer, its manifest (None for a plain GPT-2 folder)."""

    model: GPT
    tokenizer: Tokenizer
    manifest: Manifest | None
    folder: Path


def save_model(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    stage: str,
    settings: dict,
    parent: str | Path | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> Manifest:
    """Write a model artifact atomically (see the module docstring).

    extra_files maps a file name to a function that writes it at the given path; later
    stages use it to add their own files (a prompt template, label names, ...).
    """
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; the model must have a row for every token"
        )
    folder = begin_write(folder, stage)
    atomic_write_json(folder / "config.json", hf_config_dict(model.config))
    write_weights(folder / WEIGHTS, model)
    tokenizer.save(folder)
    names = ["config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name, write in (extra_files or {}).items():
        atomic_write(folder / name, write)
        names.append(name)
    return finish_write(folder, stage, settings, parent=parent, metrics=metrics, files=names, extra=extra)


def verify_files(folder: Path, manifest: Manifest, fix: str = "rerun the stage that wrote it") -> None:
    """ArtifactError naming the first file of the manifest that is missing or whose sha256
    differs, and `fix`."""
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; the folder is incomplete: {fix}")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"{path} does not match its sha256 in manifest.json: it was damaged or edited after it was "
                f"written; {fix}"
            )


def refuse_non_float(folder: Path) -> None:
    """ArtifactError unless the folder holds float weights a GPT loads as they are: a quantized
    folder or an ONNX export is named as such, with the folder to pass instead. Read from the
    files themselves, not from folder_kind: a load must refuse them whichever stage packages
    (which register those kinds) are imported."""
    onnx = (folder / "model.onnx").is_file()
    if not onnx and "quantization_config" not in config_json(folder):
        return
    manifest = read_manifest(folder)
    parent = resolved_parent(folder, manifest)
    source = f" ({parent})" if parent else ""
    if onnx:
        raise ArtifactError(f"{folder} is an ONNX export, not PyTorch weights; pass the model folder it was "
                            f"exported from{source}")
    method = (config_json(folder).get("quantization_config") or {}).get("compactgpt", {}).get("method")
    what = f" with {method}" if method else ""
    raise ArtifactError(
        f"{folder} is already quantized{what}: its integer weights cannot be loaded as a float model or "
        f"quantized again; pass the float model it was quantized from{source}"
    )


def load_model(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """Load a CompactGPT artifact or a GPT-2 folder saved by transformers.

    Raises ArtifactError for a folder that is missing, unfinished, damaged (a tensor of the
    wrong dtype or shape, checked before anything is allocated), quantized or ONNX, not GPT-2,
    or whose tokenizer does not fit the model.
    """
    folder = Path(folder)
    config = read_config(folder)
    refuse_non_float(folder)
    manifest = read_manifest(folder)
    if manifest is not None and verify:
        verify_files(folder, manifest)
    # Names, dtypes and shapes are checked from the header before anything is allocated.
    check_float_weights(weights_file(folder), config)
    state = from_hf_state_dict(read_weights(folder))
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {config.vocab_size}; this tokenizer belongs to another model. Copy the tokenizer "
            "files of the model that produced these weights"
        )
    # Rows past the tokenizer pad the embedding (to a multiple of 64): never predicted.
    model.limit_vocab(tokenizer.vocab_size)
    return LoadedModel(model.to(device).eval(), tokenizer, manifest, folder)
