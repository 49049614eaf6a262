"""The quantize stage around the math: versioned configs, the handler registry, the block
walk, folders in and out (`quantize_folder`), calibration data, the CLI verb, lean imports."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

from compactgpt.app.cli import main
from compactgpt.artifacts import load_model, resolved_parent, save_model
from compactgpt.errors import ConfigError
from quantize import (AWQConfig, GPTQConfig, METHODS, QuantizeConfig, RTNConfig, SmoothQuantConfig, config_for,
                      config_from_dict, evaluate_quantized, load_quantized, quantize_, quantize_folder, resolve_calibration,
                      save_quantized)
from quantize.calibrate import BlockHooks, CalibrationData, embed, walk_blocks
from quantize.handlers import BLOCK_LAYERS, HANDLERS, register_handler

from conftest import random_gpt

warnings.filterwarnings("ignore")


@pytest.fixture
def float_model_dir(tmp_path, data_dir, tokenizer):
    folder = tmp_path / "model"
    save_model(folder, random_gpt(0), tokenizer, stage="pretrain", settings={}, parent=data_dir)
    return folder


# ---------------------------------------------------------------------------------------
# Versioned configs


@pytest.mark.parametrize("method", list(METHODS))
def test_config_round_trips_with_its_version(method):
    config = config_for(method)
    saved = config.versioned_dict()
    assert saved["config_version"] == 2 and saved["method"] == method
    assert config_from_dict(saved) == config
    assert config_from_dict(config.to_dict()) == config  # unversioned settings (a pipeline config) are current


def test_newer_config_version_and_unknown_settings_are_refused():
    saved = GPTQConfig(group_size=32).versioned_dict()
    with pytest.raises(ConfigError, match="format version 3"):
        config_from_dict({**saved, "config_version": 3})
    with pytest.raises(ConfigError, match=r"unknown settings \['alpha'\]"):
        config_for("gptq", alpha=0.5)
    with pytest.raises(ConfigError, match="unknown quantization method"):
        config_for("int3")


def test_every_field_has_help_text():
    from compactgpt.config import field_help

    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            assert field_help(cls, f.name), f"{cls.__name__}.{f.name} has no help text"


def test_artifact_records_its_config_version_and_refuses_a_newer_one(byte_tokenizer, tmp_path):
    model = random_gpt(0)
    config = RTNConfig(bits=4, group_size=16)
    quantize_(model, config)
    save_quantized(tmp_path / "q", model, byte_tokenizer, config)
    path = tmp_path / "q" / "config.json"
    hf = json.loads(path.read_text())
    assert hf["quantization_config"]["compactgpt"]["settings"]["config_version"] == 2
    assert load_quantized(tmp_path / "q").manifest.settings["config_version"] == 2

    settings = hf["quantization_config"]["compactgpt"]["settings"]
    del settings["grid"]  # an artifact of version 1, made before the full grid: read as what made it
    settings["config_version"] = 1
    path.write_text(json.dumps(hf))
    loaded = load_quantized(tmp_path / "q", verify=False)
    assert loaded.config == config.replace(grid="midpoint")
    assert torch.equal(loaded.model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    hf["quantization_config"]["compactgpt"]["settings"]["config_version"] = 99
    path.write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="format version 99"):
        load_quantized(tmp_path / "q", verify=False)


# ---------------------------------------------------------------------------------------
# Handler registry


def test_every_method_has_a_registered_handler():
    import quantize.api  # noqa: F401  (registers the handlers)

    assert set(METHODS.values()) <= set(HANDLERS)


def test_unregistered_config_type_is_refused_and_registered_one_is_used(monkeypatch):
    @dataclasses.dataclass
    class HalfConfig(RTNConfig):
        pass

    with pytest.raises(ConfigError, match="no quantization handler for HalfConfig"):
        quantize_(random_gpt(0), HalfConfig())

    calls = []
    monkeypatch.setitem(HANDLERS, HalfConfig, lambda model, config, calib, progress: calls.append(config))
    quantize_(random_gpt(0), HalfConfig(bits=4))
    assert calls == [HalfConfig(bits=4)]
    with pytest.raises(ConfigError, match="already has a handler"):
        register_handler(HalfConfig)(lambda *a: None)


# ---------------------------------------------------------------------------------------
# The block walk


class Recorder(BlockHooks):
    def __init__(self, steps, propagate_quantized=False):
        self.steps, self.propagate_quantized = steps, propagate_quantized
        self.events: list[tuple] = []

    def observe(self, layer, x):
        self.events.append(("observe", layer, tuple(x.shape)))

    def quantize(self, index, block, layers):
        self.events.append(("quantize", index, layers))

    def finish(self, index, block):
        self.events.append(("finish", index))


def test_walk_visits_every_block_in_order_and_hands_outputs_on():
    model = random_gpt(0, n_layer=3)
    calib = CalibrationData(torch.randint(0, 320, (20, 8), generator=torch.Generator().manual_seed(0)), "random")
    hooks = Recorder((BLOCK_LAYERS,))
    out = walk_blocks(model, calib, hooks)
    steps = [e for e in hooks.events if e[0] != "observe"]
    assert steps == [e for i in range(3) for e in (("quantize", i, BLOCK_LAYERS), ("finish", i))]
    # Every layer of the step sees every batch (16 + 4 windows) before the step's quantize.
    first = hooks.events[: hooks.events.index(("quantize", 0, BLOCK_LAYERS))]
    assert sorted({e[1] for e in first}) == sorted(BLOCK_LAYERS) and len(first) == 2 * len(BLOCK_LAYERS)
    assert {e[2][0] for e in first} == {16, 4}
    x = embed(model, calib.ids)
    with torch.no_grad():
        for block in model.transformer.h:
            x = block(x)[0]
    assert torch.allclose(out, x, atol=1e-6)


def test_walk_runs_one_pass_per_step_and_recomputes_when_asked():
    model = random_gpt(0)
    calib = CalibrationData(torch.randint(0, 320, (4, 8)), "random")
    steps = tuple((layer,) for layer in BLOCK_LAYERS)
    zeroed = []

    class ZeroMLP(Recorder):
        def quantize(self, index, block, layers):
            super().quantize(index, block, layers)
            if layers == ("mlp.c_proj",):
                block.mlp.c_proj.weight.zero_()  # a change the next block must see
                block.mlp.c_proj.bias.zero_()
                zeroed.append(index)

    hooks = ZeroMLP(steps, propagate_quantized=True)
    out = walk_blocks(model, calib, hooks)
    assert [e[1:] for e in hooks.events if e[0] == "quantize"] == [(i, s) for i in range(2) for s in steps]
    assert [e[1] for e in hooks.events if e[0] == "observe"] == [s[0] for _ in range(2) for s in steps]
    x = embed(model, calib.ids)
    with torch.no_grad():
        for block in model.transformer.h:
            x = block(x)[0]  # the blocks as left by the walk
    assert zeroed == [0, 1] and torch.allclose(out, x, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Folders in, folders out


def test_quantize_folder_writes_an_artifact_that_reloads(float_model_dir, tmp_path):
    logs: list[str] = []
    config = SmoothQuantConfig(calib_samples=4, calib_seq_len=32)
    out = quantize_folder(QuantizeConfig(model=str(float_model_dir), out=str(tmp_path / "sq"), method=config,
                                         progress=False, eval=True), log=logs.append)
    assert out == tmp_path / "sq"
    loaded = load_quantized(out)
    assert loaded.config == config and loaded.manifest.settings == config.versioned_dict()
    assert resolved_parent(loaded.folder, loaded.manifest) == float_model_dir.resolve()
    assert "train split" in loaded.manifest.extra["calibration"]["source"]
    metrics = loaded.manifest.metrics
    assert metrics["val_data"].startswith("val split of") and metrics["val_kl_mean"] > 0
    assert len(logs) == 1 and logs[0].startswith(f"wrote {out}: smoothquant 8-bit") and "KL from float" in logs[0]
    again = evaluate_quantized(out, float_model_dir)  # the artifact scores as the in-memory model did
    assert again == {k: metrics[k] for k in again}


def test_quantize_folder_needs_calibration_data_it_can_find(tmp_path, tokenizer):
    save_model(tmp_path / "orphan", random_gpt(0), tokenizer, stage="test", settings={})
    with pytest.raises(ConfigError, match="records no training data; pass --data"):
        quantize_folder(QuantizeConfig(model=str(tmp_path / "orphan"), out=str(tmp_path / "q"), method=AWQConfig()),
                        log=lambda m: None)
    assert not (tmp_path / "q").exists()
    quantize_folder(QuantizeConfig(model=str(tmp_path / "orphan"), out=str(tmp_path / "q"), method=RTNConfig(),
                                   progress=False), log=lambda m: None)
    assert load_quantized(tmp_path / "q").manifest.extra["calibration"] is None


# ---------------------------------------------------------------------------------------
# CLI and calibration data


def test_cli_quantizes_with_the_training_data_by_default(float_model_dir, tmp_path, capsys):
    out = tmp_path / "gptq"
    rc = main(["quantize", "--model", str(float_model_dir), "--out", str(out), "--method", "gptq",
               "--group-size", "16", "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress", "--eval"])
    assert rc == 0
    loaded = load_quantized(out)
    calib = loaded.manifest.extra["calibration"]
    assert calib["samples"] == 4 and calib["seq_len"] == 32 and "train split" in calib["source"]
    metrics = loaded.manifest.metrics
    assert metrics["val_perplexity"] > 1 and metrics["float_val_perplexity"] > 1
    assert metrics["val_kl_mean"] > 0 and 0 < metrics["val_top1_agreement"] <= 1
    captured = capsys.readouterr()
    assert "KL from float" in captured.err and captured.out.strip() == str(out)
    assert resolved_parent(loaded.folder, loaded.manifest) == float_model_dir.resolve()


def test_cli_refuses_flags_the_method_does_not_take(float_model_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(float_model_dir), "--out", str(tmp_path / "q"), "--method", "rtn",
               "--alpha", "0.5"])
    assert rc == 2 and "does not take --alpha" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(float_model_dir), "--out", str(tmp_path / "q"), "--method", "bnb-nf4",
               "--layout", "gptq"])
    assert rc == 2 and "--layout bnb" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_cli_help_names_the_methods_of_each_flag(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--damp-percent DAMP_PERCENT GPTQ: Hessian dampening" in text
    assert "[gptq, awq, smoothquant] (default 128)" in text  # calib-samples
    assert "(default rtn 8, gptq 4, awq 4, smoothquant 8, bnb-int8 8, bnb-nf4 4)" in text  # bits


def test_calibration_from_raw_text_and_mismatched_tokenizers(float_model_dir, corpus_dir, data_dir, byte_tokenizer):
    loaded = load_model(float_model_dir)
    config = GPTQConfig(calib_samples=5, calib_seq_len=20, seed=3)
    calib = resolve_calibration(loaded, config, str(corpus_dir))
    assert calib.ids.shape == (5, 20) and int(calib.ids.max()) < loaded.tokenizer.vocab_size
    assert torch.equal(resolve_calibration(loaded, config, str(corpus_dir)).ids, calib.ids)
    assert calib.source == f"train split of {corpus_dir}"
    assert resolve_calibration(loaded, RTNConfig(), str(corpus_dir)) is None  # round-to-nearest needs none
    loaded.tokenizer = byte_tokenizer
    with pytest.raises(ConfigError, match="different tokenizer"):
        resolve_calibration(loaded, config, str(data_dir))


def test_quantize_imports_no_later_stage_no_application_and_no_bitsandbytes():
    code = ("import sys, quantize, quantize.api, quantize.stage, quantize.artifact\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('export', 'bitsandbytes') "
            "or m.startswith(('compactgpt.app', 'compactgpt.cli', 'compactgpt.pipeline')))\n"
            "print(bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
