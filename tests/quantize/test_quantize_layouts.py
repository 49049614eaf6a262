"""Storage layouts: every method's weights are saved and loaded through the layout registered
for its config type (quantize.handlers.register_layout), never through a branch on the layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from compactgpt.errors import ArtifactError, ConfigError
from quantize import RTNConfig, load_quantized, quantize_
from quantize.artifact import layout_for, quantization_config, save_quantized
from quantize.config import METHODS
from quantize.gptq_layout import GPTQ_LAYOUT, GPTQLayout
from quantize.handlers import LAYOUT_HANDLERS, layouts, register_layout

from conftest import random_gpt


def test_every_method_has_a_registered_layout():
    import quantize.artifact  # noqa: F401  (registers the layouts)

    assert set(METHODS.values()) <= set(LAYOUT_HANDLERS)
    assert sorted(layouts()) == ["bnb", "gptq"]
    assert {layout_for(cls()) for cls in METHODS.values() if cls.integer_weights} == {"gptq"}
    assert {layout_for(cls()) for cls in METHODS.values() if not cls.integer_weights} == {"bnb"}


def test_the_registered_layout_saves_and_loads_the_method(byte_tokenizer, tmp_path, monkeypatch):
    """Whatever layout is registered for a config type writes its entries into config.json and
    builds the layers read back: artifact.py holds no branch on the layout."""

    class TaggedLayout(GPTQLayout):
        def __init__(self):
            self.loaded: list[str] = []

        def quantization_config(self, config, act_bits):
            return {**super().quantization_config(config, act_bits), "tagged": True}

        def load_layer(self, model, name, tensors, config, act_bits, device):
            self.loaded.append(name)
            super().load_layer(model, name, tensors, config, act_bits, device)

    layout = TaggedLayout()
    monkeypatch.setitem(LAYOUT_HANDLERS, RTNConfig, layout)
    config = RTNConfig(bits=4, group_size=16, include_embeddings=True)
    model = random_gpt(0)
    quantize_(model, config)
    entry = quantization_config(config, "gptq", None)
    assert entry["tagged"] is True and list(entry)[-1] == "compactgpt"

    save_quantized(tmp_path / "q", model, byte_tokenizer, config)
    hf = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert hf["tagged"] is True
    loaded = load_quantized(tmp_path / "q")
    assert loaded.layout == "gptq" and loaded.config == config
    assert sorted(layout.loaded) == sorted(["lm_head", *(f"transformer.h.{i}.{p}" for i in range(2) for p in
                                                          ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))])


def test_a_config_type_without_a_layout_cannot_be_saved():
    @dataclasses.dataclass
    class UnstoredConfig(RTNConfig):
        pass

    with pytest.raises(ConfigError, match="no storage layout for UnstoredConfig"):
        layout_for(UnstoredConfig())
    with pytest.raises(ConfigError, match="already has a layout"):
        register_layout(RTNConfig, GPTQ_LAYOUT)


def test_a_layout_that_does_not_hold_the_method_is_refused_on_load(byte_tokenizer, tmp_path):
    model = random_gpt(0)
    config = RTNConfig(bits=8)
    quantize_(model, config)
    save_quantized(tmp_path / "q", model, byte_tokenizer, config)
    path = tmp_path / "q" / "config.json"
    hf = json.loads(path.read_text())
    hf["quantization_config"]["compactgpt"]["layout"] = "bnb"
    path.write_text(json.dumps(hf))
    with pytest.raises(ArtifactError, match="stored in the 'gptq' layout, but the file names 'bnb'"):
        load_quantized(tmp_path / "q", verify=False)
    hf["quantization_config"]["compactgpt"]["layout"] = "awq-packed"
    path.write_text(json.dumps(hf))
    with pytest.raises(ArtifactError, match="names no known layout"):
        load_quantized(tmp_path / "q", verify=False)


def test_gptq_layout_records_the_blocks_activation_bits(byte_tokenizer, tmp_path):
    model = random_gpt(0)
    quantize_(model, RTNConfig(bits=8, include_embeddings=True))
    for name, m in model.named_modules():
        if name.startswith("transformer.h.") and hasattr(m, "act_bits"):
            m.act_bits = 8
    saved = GPTQ_LAYOUT.save(model)
    # The head keeps float activations: only the blocks' bits are recorded.
    assert saved.act_bits == 8 and "transformer.wte" in saved.layers and "lm_head" in saved.layers
    assert all(t.device == torch.device("cpu") for t in saved.tensors.values())
