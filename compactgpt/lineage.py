"""Where an artifact came from: its ancestors through the manifests' parent links, the data
its family was trained on, the held-out text it is scored on, and whether two artifacts
speak the same tokenizer.

Every stage that needs "the teacher's training data" or "the text this model was held out
on" asks here, so the walk up the parents (export -> quantized -> student -> teacher ->
data) is written once, with one depth rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .artifacts import Manifest, read_manifest, resolved_parent
from .data import is_data_folder
from .errors import ConfigError
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


def training_data_folder(folder: str | Path) -> Path | None:
    """The prepared data folder the folder's family was pretrained on (the first ancestor
    that is a data folder), or None when the chain names none."""
    for path, manifest in ancestors(folder):
        if manifest is not None and manifest.stage == "data":
            return path
    return None


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


def data_folder_tokens(folder: str | Path, tokenizer: Tokenizer | str | Path, owner: str | Path, split: str = "val",
                       problem: str | None = None) -> torch.Tensor:
    """A split of a prepared data folder as int64 ids, after checking it was tokenized with
    `tokenizer` (the tokenizer of the model `owner`, or a folder holding it); `problem`
    replaces the default error message, for callers with another fix to name."""
    from .data import TokenShards

    require_same_tokenizer(
        folder, tokenizer,
        problem or f"{folder} was tokenized with a different tokenizer than {owner}'s; pass the raw text as "
        "--data so it is tokenized with the model's own tokenizer",
    )
    return torch.from_numpy(TokenShards(folder, split).all_tokens().astype(np.int64))


def text_tokens(source: str | Path, tokenizer: Tokenizer, text_field: str = "text") -> torch.Tensor:
    """A text source (file, folder, glob, JSONL) encoded with documents joined by <|endoftext|>."""
    from .data import read_documents

    docs, _ = read_documents(str(source), text_field)
    return _joined(docs, tokenizer)


def _joined(docs, tokenizer: Tokenizer) -> torch.Tensor:
    """The documents' ids with <|endoftext|> between documents (none after the last)."""
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(d.text))
    return torch.tensor(ids)


def heldout_tokens(folder: str | Path, manifest: Manifest | None, tokenizer: Tokenizer,
                   data: str | Path | None = None, text_field: str = "text") -> tuple[torch.Tensor, str]:
    """The token ids to score a model on, and where they come from.

    With `data`: that text, or the val split of a prepared data folder. Without: the
    held-out text of the nearest ancestor that records its training data: the val split of
    a data folder, or the validation documents of a raw-text source (e.g. the domain text a
    finetuned model was trained on, split as the finetune split it). Raises ConfigError when
    the chain records no training data.
    """
    if data is not None:
        if is_data_folder(data):
            return data_folder_tokens(data, tokenizer, folder), f"val split of {data}"
        return text_tokens(data, tokenizer, text_field), str(data)
    chain = [(folder, manifest)] if manifest is not None else []
    if chain:
        parent = resolved_parent(folder, manifest)
        if parent is not None and parent.is_dir():
            chain += list(ancestors(parent))
    for path, m in chain:
        if m is None:
            break
        parent = resolved_parent(path, m)
        if parent is not None and is_data_folder(parent):
            return data_folder_tokens(parent, tokenizer, folder), f"val split of {parent}"
        recorded = m.settings.get("data")
        if recorded:
            if is_data_folder(recorded):
                return data_folder_tokens(recorded, tokenizer, folder), f"val split of {recorded}"
            return _raw_validation_tokens(m, tokenizer), "validation split of " + str(recorded)
    raise ConfigError(f"{folder} records no training data to hold out from; pass --data with the text to score")


def _raw_validation_tokens(manifest: Manifest, tokenizer: Tokenizer) -> torch.Tensor:
    """The validation documents of a raw-text source, split as the stage that read it split them."""
    from .data import read_documents, split_documents

    docs, _ = read_documents(manifest.settings["data"], manifest.settings.get("text_field", "text"))
    _, val = split_documents(docs, manifest.settings.get("val_fraction", 0.05))
    return _joined(val, tokenizer)
