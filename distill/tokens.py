"""Token ids for calibration and evaluation, and the check that two models share a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compactgpt.artifacts import LoadedModel
from compactgpt.data import TokenShards, encode_documents, is_data_folder, read_documents, split_documents
from compactgpt.errors import ConfigError
from compactgpt.tokenizer import Tokenizer


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    """Raise ConfigError unless both tokenizers are the same (same vocabulary and merges):
    distillation compares distributions over token ids, which only means something when the
    ids mean the same strings."""
    if a.to_json() != b.to_json():
        raise ConfigError(
            f"{a_name} and {b_name} use different tokenizers ({a.vocab_size:,} vs {b.vocab_size:,} tokens "
            "or different merges): their token ids do not mean the same text. Build the student from "
            "this teacher (compactgpt prune, or a student config), or tokenize the data with the "
            "teacher's tokenizer (compactgpt tokenize --tokenizer TEACHER)"
        )


def training_data_of(loaded: LoadedModel) -> str | None:
    """The data a model was trained on, as its manifest records it: the parent data folder,
    else the `data` setting; None when the manifest says nothing."""
    m = loaded.manifest
    if m is None:
        return None
    parent = (m.parent or {}).get("path")
    if parent and Path(parent).exists() and is_data_folder(parent):
        return parent
    data = m.settings.get("data")
    if isinstance(data, str) and data:
        return data
    teacher = m.extra.get("teacher", {}).get("path") if isinstance(m.extra.get("teacher"), dict) else None
    return teacher and _data_of_folder(teacher)


def _data_of_folder(folder: str) -> str | None:
    from compactgpt.artifacts import load_model

    try:
        return training_data_of(load_model(folder, verify=False))
    except Exception:  # an unreachable ancestor only means the data must be given explicitly
        return None


@dataclass
class SplitTokens:
    train: np.ndarray
    val: np.ndarray
    source: str


def split_tokens(data: str | None, loaded: LoadedModel, text_field: str = "text",
                 val_fraction: float = 0.05) -> SplitTokens:
    """Train and validation token ids of `data` (a prepared data folder, or text tokenized
    here with the model's tokenizer); without data, the model's own training data."""
    data = data or training_data_of(loaded)
    if data is None:
        raise ConfigError(
            f"{loaded.folder} records no training data; pass --data with text (or a prepared data "
            "folder) to calibrate and evaluate on"
        )
    if is_data_folder(data):
        check_same_tokenizer(Tokenizer.from_folder(data), loaded.tokenizer, f"the data folder {data}",
                             f"the model {loaded.folder}")
        return SplitTokens(TokenShards(data, "train").all_tokens(), TokenShards(data, "val").all_tokens(),
                           f"{data} (prepared)")
    docs, _ = read_documents(data, text_field)
    train, val = split_documents(docs, val_fraction)
    return SplitTokens(encode_documents(train, loaded.tokenizer), encode_documents(val, loaded.tokenizer), data)


def calibration_batches(tokens: np.ndarray, n_windows: int, block_size: int, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """n_windows random windows of block_size tokens, in (batch_size, block_size) batches;
    the same windows for the same seed."""
    if len(tokens) < block_size + 1:
        raise ConfigError(
            f"calibration needs at least {block_size + 1} tokens, the data has {len(tokens)}; "
            "give more text or a smaller --block-size"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - block_size, (n_windows,), generator=g).tolist()
    rows = torch.stack([torch.from_numpy(np.asarray(tokens[s:s + block_size], dtype=np.int64)) for s in starts])
    return list(rows.split(batch_size))


def eval_slice(tokens: np.ndarray, limit: int) -> torch.Tensor:
    """The first `limit` validation tokens (all when limit is 0), as a LongTensor."""
    if limit:
        tokens = tokens[:limit]
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
