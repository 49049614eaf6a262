"""Loading checks a weights file against its config from the safetensors header: a tensor of
the wrong dtype or shape, or a config with absurd sizes, is a one-line ArtifactError naming
the tensor, before anything is allocated (issue 15)."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from compactgpt.artifacts import MANIFEST, WEIGHTS, load_model, save_model
from compactgpt.errors import ArtifactError
from compactgpt.io import sha256_file
from conftest import random_gpt


def _rewrite(folder, change) -> None:
    """Rewrite model.safetensors with `change(tensors)` applied, and fix up the manifest's hash
    so that only the dtype / shape checks can catch what changed."""
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(path)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def float_folder(tmp_path, byte_tokenizer):
    folder = tmp_path / "m"
    save_model(folder, random_gpt(), byte_tokenizer, stage="test", settings={})
    return folder


def test_a_float_tensor_stored_as_int32_is_refused(float_folder):
    name = "transformer.h.0.mlp.c_fc.weight"

    def to_int(t):
        t[name] = (t[name] * 1000).to(torch.int32)

    _rewrite(float_folder, to_int)
    with pytest.raises(ArtifactError, match=rf"{name} is stored as I32, expected F32 or F16 or BF16") as e:
        load_model(float_folder)
    assert "\n" not in str(e.value) and "rerun" in str(e.value)


def test_a_half_precision_folder_still_loads(float_folder):
    _rewrite(float_folder, lambda t: t.update({k: v.half() for k, v in t.items()}))
    assert load_model(float_folder).model.config.n_layer == 2


def test_a_tensor_of_the_wrong_shape_is_named(float_folder):
    name = "transformer.h.1.attn.c_proj.bias"
    _rewrite(float_folder, lambda t: t.update({name: torch.zeros(7)}))
    with pytest.raises(ArtifactError, match=rf"{name} has shape \(7,\) but config.json implies \(32,\)"):
        load_model(float_folder)


def test_a_huge_vocab_size_fails_at_once_without_allocating(float_folder):
    (float_folder / MANIFEST).unlink()  # a transformers-style folder: no hashes to catch the edit
    config = json.loads((float_folder / "config.json").read_text())
    config["vocab_size"] = 10**9
    (float_folder / "config.json").write_text(json.dumps(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="implies 32,000,0.*parameters.*vocab_size 1,000,000,000") as e:
        load_model(float_folder)
    assert time.perf_counter() - start < 1.0
    # ru_maxrss is in KiB on Linux: the 128 GB embedding was never allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000
    assert "\n" not in str(e.value)


def test_a_vocab_size_that_disagrees_with_the_file_names_the_embedding(float_folder):
    (float_folder / MANIFEST).unlink()
    config = json.loads((float_folder / "config.json").read_text())
    config["vocab_size"] = 640  # small enough for the size check: the shape check names it
    (float_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"transformer.wte.weight has shape \(320, 32\) but config.json "
                                            r"implies \(640, 32\)"):
        load_model(float_folder)


@pytest.fixture
def quantized_folder(float_folder, tmp_path):
    from quantize import QuantizeConfig, quantize_folder
    from quantize.config import RTNConfig

    out = tmp_path / "q"
    quantize_folder(QuantizeConfig(model=str(float_folder), out=str(out), method=RTNConfig(bits=4, group_size=0),
                                   progress=False), log=lambda m: None)
    return out


def test_packed_int4_weights_stored_as_float_are_refused(quantized_folder):
    from quantize import load_quantized

    name = "transformer.h.0.attn.c_attn.qweight"
    _rewrite(quantized_folder, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(ArtifactError, match=rf"{name} is stored as F32, expected I32.*rerun quantize"):
        load_quantized(quantized_folder)


def test_quantized_scales_of_the_wrong_dtype_are_refused(quantized_folder):
    from quantize import load_quantized

    name = "transformer.h.1.mlp.c_proj.scales"
    _rewrite(quantized_folder, lambda t: t.update({name: t[name].to(torch.int32)}))
    with pytest.raises(ArtifactError, match=rf"{name} is stored as I32, expected F16 or F32"):
        load_quantized(quantized_folder)


def test_a_quantized_folder_loads_and_is_refused_as_a_float_model(quantized_folder, float_folder):
    from quantize import load_quantized

    assert load_quantized(quantized_folder).layout == "gptq"
    with pytest.raises(ArtifactError, match=rf"already quantized with rtn.*float model it was quantized from "
                                            rf"\({float_folder.resolve()}\)"):
        load_model(quantized_folder)
