"""Where calibration and evaluation tokens come from: the settings every calibrated stage
(prune, sparsify) shares, the token ids themselves, and the check that two models share a
tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compactgpt.artifacts import LoadedModel, resolved_parent
from compactgpt.config import StageConfig, option
from compactgpt.data import (TokenShards, encode_documents, is_data_folder, random_windows, read_documents,
                             split_documents)
from compactgpt.device import DEVICE_HELP, resolve_device
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.lineage import ancestors, require_same_tokenizer
from compactgpt.tokenizer import Tokenizer


@dataclass
class CalibrationConfig(StageConfig):
    """The settings of a stage that calibrates on a model's activations and scores the result
    by perplexity: which model, where to write, and which tokens to calibrate and evaluate on."""

    model: str = option("", "model folder")
    out: str = option("", "folder to write the result to")
    data: str | None = option(None, "calibration and evaluation data: a prepared data folder or text (file, "
                              "folder, glob, JSONL, @stdlib); default: the data the model was trained on, as "
                              "its manifest records")
    text_field: str = option("text", "JSONL field that holds the text")
    val_fraction: float = option(0.05, "held-out share of documents when --data is text (perplexity is "
                                 "measured on it)")
    calib_windows: int = option(64, "calibration windows (random windows of the training split)")
    block_size: int = option(0, "tokens per calibration window (0: the model's n_positions)")
    eval_tokens: int = option(0, "validation tokens for perplexity before/after (0: the whole split)")
    seed: int = option(0, "seed of the calibration windows")
    # Where the stage runs is not a property of what it writes: kept out of the saved settings,
    # so the manifest and the pipeline's fingerprint are the same on any device.
    device: str = option("auto", f"where the model is calibrated and scored: {DEVICE_HELP}", saved=False)

    def validate(self) -> None:
        resolve_device(self.device)  # a device this machine lacks is refused before any work
        if self.calib_windows <= 0 or self.block_size < 0 or self.eval_tokens < 0:
            raise ConfigError(f"--calib-windows must be positive, --block-size and --eval-tokens >= 0; got "
                              f"{self.calib_windows}, {self.block_size}, {self.eval_tokens}")
        if self.block_size == 1:
            raise ConfigError("--block-size must be 0 (the model's n_positions) or at least 2 tokens, got 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    """Raise ConfigError unless both tokenizers are the same (same vocabulary and merges):
    distillation compares distributions over token ids, which only means something when the
    ids mean the same strings."""
    require_same_tokenizer(
        a, b,
        f"{a_name} and {b_name} use different tokenizers ({a.vocab_size:,} vs {b.vocab_size:,} tokens "
        "or different merges): their token ids do not mean the same text. Build the student from "
        "this teacher (compactgpt prune, or a student config), or tokenize the data with the "
        "teacher's tokenizer (compactgpt tokenize --tokenizer TEACHER)",
    )


def training_data_of(folder: str | Path) -> str | None:
    """The data a model was trained on, as its family's manifests record it: walking from the
    model up its parents, the first parent that is a data folder or the first `data` setting;
    None when the chain says nothing (or an ancestor cannot be read: the data must then be
    given explicitly)."""
    try:
        for path, manifest in ancestors(folder):
            if manifest is None:
                return None
            parent = resolved_parent(path, manifest)
            if parent is not None and parent.exists() and is_data_folder(parent):
                return str(parent)
            data = manifest.settings.get("data")
            if isinstance(data, str) and data:
                return data
    except ArtifactError:
        return None
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
    data = data or training_data_of(loaded.folder)
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
    rows = random_windows(torch.from_numpy(np.asarray(tokens)), n_windows, block_size,
                          torch.Generator().manual_seed(seed))
    return list(rows.long().split(batch_size))


def eval_slice(tokens: np.ndarray, limit: int) -> torch.Tensor:
    """The first `limit` validation tokens (all when limit is 0), as a LongTensor."""
    if limit:
        tokens = tokens[:limit]
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
