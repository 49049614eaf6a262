"""Where an artifact came from: its ancestors through the manifests' parent links, the data
its family was trained on (`training_data`), and whether two artifacts speak the same
tokenizer.

Every stage that needs "the teacher's training data" asks here, so the walk up the parents
(export -> quantized -> student -> teacher -> data) is written once, with one depth rule
and one rule for which recorded data counts. Reading tokens from that data (calibration
windows, held-out text) is `compactgpt.calibration`'s.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .artifacts import MANIFEST, Manifest, read_manifest, resolved_parent
from .data import is_data_folder
from .errors import ArtifactError, ConfigError
from .tokenizer import Tokenizer

# Longer than any real chain (data -> teacher -> finetune -> prune -> distill -> quantize ->
# export is 7); a cycle of hand-edited manifests ends here instead of looping.
MAX_DEPTH = 32


def ancestors(folder: str | Path) -> Iterator[tuple[Path, Manifest | None]]:
    """(folder, manifest) for the folder itself and then each parent, newest first. Stops at
    a folder without a manifest (yielded with None), at a parent that no longer exists, and
    after MAX_DEPTH folders. Raises ArtifactError for an unfinished folder (like read_manifest)."""
    path: Path | None = Path(folder)
    for _ in range(MAX_DEPTH):
        if path is None or not path.is_dir():
            return
        manifest = read_manifest(path)
        yield path, manifest
        if manifest is None:
            return
        path = resolved_parent(path, manifest)


@dataclass(frozen=True)
class TrainingData:
    """Data a model was (or is to be) trained on: a prepared data folder, or a raw-text
    source with the settings that split it (JSONL field, held-out share)."""

    path: str  # usable from here: a recorded relative path is resolved against its folder
    prepared: bool
    text_field: str = "text"
    val_fraction: float = 0.05


def training_data(folder: str | Path, manifest: Manifest | None = None, flag: str = "--data") -> TrainingData | None:
    """The data the model in `folder` was trained on, as its family's manifests record it.

    The one rule for every stage: walking from the model up its parents, the first folder
    that records data decides: its parent when that is a prepared data folder, else its
    `data` setting (a prepared data folder, or raw text split as that stage split it, with
    its `text_field` and `val_fraction`; a finetuning `task` other than lm trained on
    examples, not running text, and is passed over). So a model finetuned on domain text is
    calibrated and scored on that text, and a pretrained one on its data folder. `manifest` is the
    folder's own when the caller has read it already. Returns None when the chain records
    no data (or an ancestor cannot be read). Raises ConfigError, naming the path as the
    manifest records it and `flag`, when the recorded data is not there (a folder copied or
    moved without the data it names)."""
    try:
        for path, m in _chain(folder, manifest):
            if m is None:
                return None
            parent = resolved_parent(path, m)
            if parent is not None and is_data_folder(parent):
                return TrainingData(str(parent), True)
            data = m.settings.get("data")
            if not isinstance(data, str) or not data or m.settings.get("task", "lm") != "lm":
                continue  # nothing recorded, or examples (instructions, labelled text) rather than running text
            if is_data_folder(data):
                return TrainingData(data, True)
            if _absent(data):
                raise ConfigError(
                    f"{path} records its training data as {_as_recorded(path, data)!r}, which is not there "
                    f"({data}): the folder was moved or copied without it; pass {flag} with that data or other text"
                )
            return TrainingData(data, False, m.settings.get("text_field", "text"), m.settings.get("val_fraction", 0.05))
    except ArtifactError:
        return None  # an ancestor that cannot be read: the data must be given explicitly
    return None


def _chain(folder: str | Path, manifest: Manifest | None) -> Iterator[tuple[Path, Manifest | None]]:
    """ancestors(folder), starting from `manifest` when the caller read the folder's already."""
    if manifest is None:
        yield from ancestors(folder)
        return
    yield Path(folder), manifest
    parent = resolved_parent(folder, manifest)
    if parent is not None:
        yield from ancestors(parent)


def _absent(source: str) -> bool:
    """True for a path that names nothing here (a text source like @stdlib is not a path)."""
    return os.path.isabs(source) and not glob.glob(source)


def _as_recorded(folder: Path, value: str) -> str:
    """A setting as the manifest file holds it (relative to the folder when written so)."""
    try:
        settings = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8")).get("settings", {})
        return str(settings.get("data", value))
    except (OSError, ValueError):
        return value


def same_tokenizer(a: Tokenizer | str | Path, b: Tokenizer | str | Path) -> bool:
    """True when both (tokenizers, or folders holding tokenizer.json) encode text identically."""
    return _tokenizer_json(a) == _tokenizer_json(b)


def _tokenizer_json(t: Tokenizer | str | Path) -> str | None:
    if isinstance(t, Tokenizer):
        return t.to_json()
    path = Path(t) / "tokenizer.json"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def require_same_tokenizer(a: Tokenizer | str | Path, b: Tokenizer | str | Path, problem: str) -> None:
    """ConfigError(problem) unless a and b share a tokenizer; `problem` names both and the fix."""
    if not same_tokenizer(a, b):
        raise ConfigError(problem)
