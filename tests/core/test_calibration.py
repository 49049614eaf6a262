"""Calibration and evaluation tokens, read one way for every stage: the calibration settings
and their old names, the windows prune, sparsify and quantize draw, and the train /
validation tokens of a data source."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compactgpt import calibration
from compactgpt.artifacts import load_model, save_model
from compactgpt.calibration import (CalibrationConfig, calibration_windows, data_tokens, first_tokens,
                                    window_length)
from compactgpt.data import TokenShards, random_windows
from compactgpt.errors import ConfigError, DataError
from distill import PruneConfig, SparsifyConfig, prune, sparsify
from quantize import GPTQConfig, resolve_calibration

from conftest import random_gpt


def test_old_setting_names_load_and_fingerprint_as_before():
    old = {"model": "m", "out": "o", "calib_windows": 8, "block_size": 32}
    config = PruneConfig.from_dict(old)
    assert (config.calib_samples, config.calib_seq_len) == (8, 32)
    assert config.to_dict()["calib_samples"] == 8 and "calib_windows" not in config.to_dict()
    fingerprint = config.fingerprint_dict()
    assert fingerprint["calib_windows"] == 8 and fingerprint["block_size"] == 32 and "calib_samples" not in fingerprint
    assert PruneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="old name of 'calib_samples'"):
        PruneConfig.from_dict({**old, "calib_samples": 8})


def test_every_calibrated_stage_shares_the_fields_and_keeps_its_default():
    fields = {cls: {f.name: f for f in cls.__dataclass_fields__.values()}
              for cls in (CalibrationConfig, PruneConfig, SparsifyConfig, GPTQConfig)}
    for name in ("calib_samples", "calib_seq_len", "seed"):
        assert len({f[name].metadata["help"] for f in fields.values()}) == 1, name
    assert PruneConfig(model="m", out="o").calib_samples == 64 and GPTQConfig().calib_samples == 128
    for bad, message in (({"calib_samples": 0}, "--calib-samples must be positive"),
                         ({"calib_seq_len": 1}, "--calib-seq-len must be 0")):
        with pytest.raises(ConfigError, match=message):
            PruneConfig(model="m", out="o", **bad)
        with pytest.raises(ConfigError, match=message):
            GPTQConfig(**bad)


def test_windows_are_reproducible_and_fit_the_model(corpus_dir, tokenizer):
    model = SimpleNamespace(folder="m", tokenizer=tokenizer)
    tokens = data_tokens(str(corpus_dir), model)
    ids = calibration_windows(tokens.train, 5, 20, 64, seed=3)
    assert ids.shape == (5, 20) and ids.dtype == torch.int64 and int(ids.max()) < tokenizer.vocab_size
    assert torch.equal(calibration_windows(tokens.train, 5, 20, 64, seed=3), ids)
    assert not torch.equal(calibration_windows(tokens.train, 5, 20, 64, seed=4), ids)
    assert calibration_windows(tokens.train, 2, 0, 48).shape == (2, 48)  # 0: the model's n_positions
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        window_length(100, 64)
    with pytest.raises(DataError, match="lower --calib-seq-len"):
        calibration_windows(np.arange(10), 2, 16, 64)


def test_a_data_folders_windows_are_the_windows_of_its_tokens(data_dir, tokenizer):
    """A data folder is sampled without loading it, with the same draws as its tokens in memory
    (one shard here)."""
    tokens = data_tokens(str(data_dir), SimpleNamespace(folder="m", tokenizer=tokenizer))
    assert isinstance(tokens.train, TokenShards) and len(tokens.train.shards) == 1
    in_memory = torch.from_numpy(tokens.train.all_tokens().astype(np.int64))
    want = random_windows(in_memory, 6, 16, torch.Generator().manual_seed(2))
    assert torch.equal(calibration_windows(tokens.train, 6, 16, 64, seed=2), want)
    assert torch.equal(tokens.validation(100), first_tokens(TokenShards(data_dir, "val"))[:100])


def test_data_tokens_split_text_and_refuse_another_tokenizer(corpus_dir, data_dir, tokenizer, byte_tokenizer):
    tokens = data_tokens(str(corpus_dir), SimpleNamespace(folder="m", tokenizer=tokenizer), val_fraction=0.2)
    assert len(tokens.train) > len(tokens.val) > 0 and tokens.source == str(corpus_dir)
    with pytest.raises(ConfigError, match="different tokenizer"):
        data_tokens(str(data_dir), SimpleNamespace(folder="m", tokenizer=byte_tokenizer))
    with pytest.raises(ConfigError, match="records no training data; pass --data"):
        data_tokens(None, SimpleNamespace(folder="m", tokenizer=tokenizer), flag="--data")


def test_prune_sparsify_and_quantize_draw_the_same_windows(tmp_path, data_dir, tokenizer, monkeypatch):
    teacher = tmp_path / "teacher"
    save_model(teacher, random_gpt(3), tokenizer, stage="pretrain", settings={"data": str(data_dir)}, parent=data_dir)
    drawn: dict[str, torch.Tensor] = {}

    def spy(name):
        def draw(*args, **kwargs):
            drawn[name] = calibration.calibration_windows(*args, **kwargs)
            return drawn[name]
        return draw

    for name, module in (("prune", "distill.prune"), ("sparsify", "distill.sparsity"), ("quantize", "quantize.stage")):
        monkeypatch.setattr(importlib.import_module(module), "calibration_windows", spy(name))
    same = dict(calib_samples=6, calib_seq_len=16, seed=7)
    prune(PruneConfig(model=str(teacher), out=str(tmp_path / "p"), layers=1, eval_tokens=200, progress=False, **same),
          log=lambda m: None)
    sparsify(SparsifyConfig(model=str(teacher), out=str(tmp_path / "s"), eval_tokens=200, progress=False, **same),
             log=lambda m: None)
    calib = resolve_calibration(load_model(teacher), GPTQConfig(**same))
    assert set(drawn) == {"prune", "sparsify", "quantize"} and drawn["prune"].shape == (6, 16)
    assert torch.equal(drawn["prune"], drawn["sparsify"]) and torch.equal(drawn["prune"], drawn["quantize"])
    assert torch.equal(calib.ids, drawn["quantize"]) and calib.source == f"train split of {data_dir} (prepared)"
