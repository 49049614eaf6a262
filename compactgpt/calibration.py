"""The tokens a stage calibrates on, trains on and is scored on, read one way for every stage.

    data_source(data, folder)           the data given, else the model's own training data
    data_tokens(data, model)            its train split and its validation split, as token ids
    calibration_windows(train, ...)     calib_samples random windows of calib_seq_len tokens
    heldout_tokens(folder, ...)         the text a model is scored on by default

Prune, sparsify and quantize calibrate on the same windows for the same settings: each
declares the calibration set with the options below (one name, one flag, one help text;
each stage keeps its own default count) and draws it with `calibration_windows`. Distill
trains on `data_source` too, so "the model's training data" means the same thing
everywhere (the rule itself is `compactgpt.lineage.training_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .config import StageConfig, option
from .data import TokenShards, encode_documents, is_data_folder, random_windows, read_documents, split_documents
from .device import DEVICE_HELP, resolve_device
from .errors import ConfigError, DataError
from .lineage import TrainingData, require_same_tokenizer, training_data
from .tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------
# The calibration set: samples x sequence length, the same fields in every calibrated stage


def calib_samples_option(default: int):
    """The `calib_samples` field with its shared help; `default` is the stage's own count."""
    return option(default, "calibration windows, drawn at random from the training split of the calibration data")


def calib_seq_len_option():
    """The `calib_seq_len` field: tokens per window, 0 for the model's n_positions."""
    return option(0, "tokens per calibration window (0 = the model's n_positions)")


def calib_seed_option():
    """The `seed` field of a calibrated stage: which windows are drawn."""
    return option(0, "seed that picks the calibration windows")


def check_calibration(samples: int, seq_len: int, where: str = "") -> None:
    """ConfigError unless samples > 0 and seq_len is 0 (the model's n_positions) or >= 2
    (a window must predict at least one next token); `where` prefixes the message."""
    if samples <= 0:
        raise ConfigError(f"{where}--calib-samples must be positive, got {samples}")
    if seq_len < 0 or seq_len == 1:
        raise ConfigError(f"{where}--calib-seq-len must be 0 (the model's n_positions) or at least 2 tokens, "
                          f"got {seq_len}")


def window_length(seq_len: int, n_positions: int) -> int:
    """The tokens per calibration window: `seq_len`, or n_positions for 0. ConfigError when
    it is longer than the model's positions."""
    length = seq_len or n_positions
    if length > n_positions:
        raise ConfigError(f"--calib-seq-len {length} exceeds the model's {n_positions} positions; pass "
                          f"--calib-seq-len {n_positions} or less (0 = the model's n_positions)")
    return length


def calibration_windows(train: TokenShards | np.ndarray, samples: int, seq_len: int, n_positions: int,
                        seed: int = 0) -> torch.Tensor:
    """`samples` windows of `window_length(seq_len, n_positions)` tokens at random places of a
    training split (a data folder's split, read without loading it, or token ids), as a
    (samples, length) LongTensor on the CPU: the same windows for the same arguments, in every
    stage. Raises DataError when the split holds no window of that length."""
    length = window_length(seq_len, n_positions)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(train, TokenShards):
        longest = int(train.lengths.max()) if train.shards else 0
        have = f"the train split of {train.folder} ({train.n_tokens:,} tokens)"
    else:
        longest = len(train)
        have = f"the calibration text ({longest:,} tokens)"
    if longest < length + 1:
        raise DataError(f"{have} holds no calibration window of {length} tokens; give more text or a lower "
                        "--calib-seq-len")
    if isinstance(train, TokenShards):
        return train.sample(samples, length, generator)[0]
    return random_windows(torch.from_numpy(np.asarray(train, dtype=np.int64)), samples, length, generator)


@dataclass
class CalibrationConfig(StageConfig):
    """The settings of a stage that calibrates on a model's activations and scores the result
    by perplexity (prune, sparsify): which model, where to write, and which tokens to
    calibrate and evaluate on."""

    # Named calib_windows and block_size until the calibration settings of every stage were
    # unified: old settings still load, and fingerprints keep the names they were made with.
    renamed: ClassVar[dict[str, str]] = {"calib_samples": "calib_windows", "calib_seq_len": "block_size"}

    model: str = option("", "model folder")
    out: str = option("", "folder to write the result to")
    data: str | None = option(None, "calibration and evaluation data: a prepared data folder or text (file, "
                              "folder, glob, JSONL, @stdlib); default: the data the model was trained on, as "
                              "its manifest records")
    text_field: str = option("text", "JSONL field that holds the text")
    val_fraction: float = option(0.05, "held-out share of documents when --data is text (perplexity is "
                                 "measured on it)")
    calib_samples: int = calib_samples_option(64)
    calib_seq_len: int = calib_seq_len_option()
    eval_tokens: int = option(0, "validation tokens for perplexity before/after (0: the whole split)")
    seed: int = calib_seed_option()
    # Where the stage runs is not a property of what it writes: kept out of the saved settings,
    # so the manifest and the pipeline's fingerprint are the same on any device.
    device: str = option("auto", f"where the model is calibrated and scored: {DEVICE_HELP}", saved=False)

    def validate(self) -> None:
        resolve_device(self.device)  # a device this machine lacks is refused before any work
        check_calibration(self.calib_samples, self.calib_seq_len)
        if self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be >= 0 (0: the whole split), got {self.eval_tokens}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")


# ---------------------------------------------------------------------------------------
# Train and validation tokens of a data source, for one model


def data_source(data: str | Path | None, folder: str | Path, text_field: str = "text", val_fraction: float = 0.05,
                flag: str = "--data") -> TrainingData:
    """The data to use for the model in `folder`: `data` when given (split by text_field and
    val_fraction when it is text), else the model's own training data as its manifests
    record it (`compactgpt.lineage.training_data`). Raises ConfigError, naming `flag`, when
    no data is given and the manifests record none or name data that is not there."""
    if data is not None:
        prepared = is_data_folder(data)
        return TrainingData(str(data), prepared, text_field, val_fraction)
    found = training_data(folder, flag=flag)
    if found is None:
        raise ConfigError(f"{folder} records no training data; pass {flag} with text or a prepared data folder")
    return found


def check_data_tokenizer(folder: str | Path, tokenizer: Tokenizer | str | Path, owner: str | Path,
                         flag: str = "--data") -> None:
    """ConfigError unless the prepared data folder was tokenized with the tokenizer of the
    model `owner` (token ids mean nothing with another vocabulary)."""
    require_same_tokenizer(
        folder, tokenizer,
        f"the data folder {folder} and the model {owner} use different tokenizers (its token ids mean other text); "
        f"pass the raw text as {flag} so it is tokenized with the model's own tokenizer (or tokenize it with "
        f"`compactgpt tokenize --tokenizer {owner}`)",
    )


def data_folder_tokens(folder: str | Path, tokenizer: Tokenizer | str | Path, owner: str | Path, split: str = "val",
                       problem: str | None = None) -> torch.Tensor:
    """A split of a prepared data folder as int64 ids, after checking it was tokenized with
    `tokenizer` (the tokenizer of the model `owner`, or a folder holding it); `problem`
    replaces the default error message, for callers with another fix to name."""
    if problem is None:
        check_data_tokenizer(folder, tokenizer, owner)
    else:
        require_same_tokenizer(folder, tokenizer, problem)
    return first_tokens(TokenShards(folder, split))


def first_tokens(split: TokenShards | np.ndarray, limit: int = 0) -> torch.Tensor:
    """The first `limit` tokens of a split (all of them for 0), as an int64 tensor; a data
    folder's split is read only as far as needed."""
    if isinstance(split, TokenShards):
        parts, have = [], 0
        for shard in split.shards:
            if limit and have >= limit:
                break
            parts.append(np.asarray(shard[: limit - have] if limit else shard))
            have += len(parts[-1])
        split = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    elif limit:
        split = split[:limit]
    return torch.from_numpy(np.asarray(split, dtype=np.int64))


@dataclass
class DataTokens:
    """A data source's token ids for one model: the training split (calibration windows are
    drawn from it), the validation split (perplexity is measured on it) and a description."""

    train: TokenShards | np.ndarray
    val: TokenShards | np.ndarray
    source: str

    def validation(self, limit: int = 0) -> torch.Tensor:
        """The first `limit` validation tokens (all for 0), int64."""
        return first_tokens(self.val, limit)


def data_tokens(data: str | Path | None, model, text_field: str = "text", val_fraction: float = 0.05,
                flag: str = "--data") -> DataTokens:
    """The train and validation token ids of `data_source(data, model.folder, ...)` for a
    loaded model (folder, tokenizer): a prepared data folder's splits (checked to share the
    model's tokenizer), or text split into documents and tokenized here. Raises ConfigError
    as data_source does, or for a data folder with another tokenizer."""
    source = data_source(data, model.folder, text_field, val_fraction, flag)
    if source.prepared:
        check_data_tokenizer(source.path, model.tokenizer, model.folder, flag)
        return DataTokens(TokenShards(source.path, "train"), TokenShards(source.path, "val"),
                          f"{source.path} (prepared)")
    docs, _ = read_documents(source.path, source.text_field)
    train, val = split_documents(docs, source.val_fraction)
    return DataTokens(encode_documents(train, model.tokenizer), encode_documents(val, model.tokenizer), source.path)


def heldout_tokens(folder: str | Path, manifest, tokenizer: Tokenizer, data: str | Path | None = None,
                   text_field: str = "text") -> tuple[torch.Tensor, str]:
    """The token ids to score a model on, and where they come from.

    With `data`: the val split of a prepared data folder, or all of a text (text given to
    score on is held out already). Without: the validation split of the model's training
    data (`compactgpt.lineage.training_data`; raw text is split as the stage that read it
    split it). `manifest` is the folder's own, as the caller read it. Raises ConfigError when
    the manifests record no training data or name data that is not there."""
    if data is not None and not is_data_folder(data):
        docs, _ = read_documents(str(data), text_field)
        return torch.from_numpy(encode_documents(docs, tokenizer).astype(np.int64)), str(data)
    source = data_source(data, folder, text_field) if data is not None else training_data(folder, manifest)
    if source is None:
        raise ConfigError(f"{folder} records no training data to hold out from; pass --data with the text to score")
    if source.prepared:
        return data_folder_tokens(source.path, tokenizer, folder), f"val split of {source.path}"
    docs, _ = read_documents(source.path, source.text_field)
    _, val = split_documents(docs, source.val_fraction)
    return torch.from_numpy(encode_documents(val, tokenizer).astype(np.int64)), f"validation split of {source.path}"
