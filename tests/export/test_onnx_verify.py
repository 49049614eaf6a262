"""ONNX folders checked before they run (export.verify), and the preallocated KV cache
(export.runtime.KVCache): same tokens as PyTorch, no memory that grows per step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compactgpt.app.cli import main
from compactgpt.artifacts import resolved_parent, MANIFEST, read_manifest, save_model
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.io import atomic_write_json, sha256_file
from compactgpt.tokenizer import train_bpe
from export import ExportConfig, OnnxDecoder, export_onnx
from export.spec import DATA_FILE, MODEL_FILE
from tests.conftest import random_gpt

N_POSITIONS = 256


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify") / "model"
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n", "hello world\n"] * 30, vocab_size=300)
    save_model(folder, random_gpt(3, n_positions=N_POSITIONS), tokenizer, stage="pretrain", settings={})
    return folder


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "onnx"
    return export_onnx(ExportConfig(model=str(source), out=str(out), external_data="always"), log=lambda m: None)


@pytest.fixture
def copy(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "copy")


def flip_byte(path, offset=None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_config(folder, rehash: bool, **changes) -> None:
    """Change config.json; rehash: also record its new sha256 in the manifest (as a hand-made
    or foreign folder would have it), so only the check against the graph can catch it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    if rehash:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"]["config.json"] = sha256_file(path)
        atomic_write_json(folder / MANIFEST, manifest)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------
# File hashes


@pytest.mark.parametrize("name", [MODEL_FILE, DATA_FILE])
def test_a_flipped_weight_byte_is_refused_before_onnx_runtime(copy, name, tmp_path, capsys):
    flip_byte(copy / name)
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256.*re-export it: compactgpt export"):
        OnnxDecoder(copy)
    assert main(["generate", "--model", str(copy), "--prompt", "def f", "--max-new-tokens", "4"]) == 2
    assert f"{name} does not match its sha256" in one_line_error(capsys)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    assert main(["eval", "--model", str(copy), "--data", str(text), "--max-length", "32"]) == 2
    err = one_line_error(capsys)
    assert "sha256" in err and "re-export" in err and str(resolved_parent(copy, read_manifest(copy))) in err


def test_verify_false_skips_the_hashes_only(copy):
    flip_byte(copy / "genai_config.json", offset=0)
    with pytest.raises(ArtifactError, match="genai_config.json does not match its sha256"):
        OnnxDecoder(copy)
    OnnxDecoder(copy, verify=False)  # the caller vouches for the bytes
    edit_config(copy, rehash=False, n_head=8)
    with pytest.raises(ArtifactError, match="n_head=8"):  # the graph check is never skipped
        OnnxDecoder(copy, verify=False)


def test_a_missing_listed_file_is_refused(copy):
    (copy / DATA_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{DATA_FILE} is listed in the manifest but missing.*re-export"):
        OnnxDecoder(copy)


# ---------------------------------------------------------------------------------------
# config.json against the graph


def test_edited_n_positions_is_refused(copy, capsys):
    edit_config(copy, rehash=False, n_positions=128)
    with pytest.raises(ArtifactError, match="config.json does not match its sha256"):
        OnnxDecoder(copy)
    edit_config(copy, rehash=True, n_positions=128)
    with pytest.raises(ArtifactError, match=f"n_positions=128 but the model was exported with {N_POSITIONS}"):
        OnnxDecoder(copy)
    assert main(["generate", "--model", str(copy), "--prompt", "def f", "--max-new-tokens", "4"]) == 2
    assert "n_positions=128" in one_line_error(capsys)


@pytest.mark.parametrize("changes,message", [
    ({"n_head": 8}, "n_head=8 but the graph's past_key_values.0.key has 4 heads"),
    ({"n_head": 2}, "n_head=2 but the graph's past_key_values.0.key has 4 heads"),
    ({"n_embd": 64}, "n_embd=64 / n_head=4 gives heads of width 16 but the graph's past_key_values.0.key has width 8"),
    ({"n_layer": 3}, "n_layer=3 but the graph has KV inputs for 2 layers"),
    ({"n_layer": 1}, "n_layer=1 but the graph has KV inputs for 2 layers"),
    ({"vocab_size": 384}, "vocab_size=384 but the graph's logits have 320"),
])
def test_config_that_disagrees_with_the_graph_is_one_line_error(copy, changes, message, capsys):
    edit_config(copy, rehash=True, **changes)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(")):
        OnnxDecoder(copy)
    assert main(["generate", "--model", str(copy), "--prompt", "def f", "--max-new-tokens", "4"]) == 2
    err = one_line_error(capsys)
    assert message in err and "re-export" in err


def test_a_folder_without_manifest_still_gets_the_graph_check(copy):
    (copy / MANIFEST).unlink()
    OnnxDecoder(copy)  # nothing to hash against: loads
    edit_config(copy, rehash=False, n_head=8)
    with pytest.raises(ArtifactError, match="n_head=8"):
        OnnxDecoder(copy)


# ---------------------------------------------------------------------------------------
# The preallocated KV cache


def test_long_greedy_generation_equals_pytorch(exported, source):
    from compactgpt.artifacts import load_model

    model = load_model(source).model
    decoder = OnnxDecoder(exported, threads=1)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    # 2 rows x 4 heads: present and past could not share one buffer (see KVCache).
    ref = model.generate(ids, 200, attention_mask=mask)
    assert torch.equal(decoder.generate(ids, 200, attention_mask=mask), ref)
    per_step = OnnxDecoder(exported, threads=1, preallocate=False)
    assert torch.equal(per_step.generate(ids, 200, attention_mask=mask), ref)


def test_decode_steps_reuse_the_same_buffers(exported):
    decoder = OnnxDecoder(exported, threads=1)
    caches = []
    new_cache = decoder.new_cache
    decoder.new_cache = lambda batch, capacity: caches.append(new_cache(batch, capacity)) or caches[-1]
    pointers: list[set[int]] = []
    for _ in decoder.stream(torch.tensor([[5, 6, 7]]), 60):
        cache = caches[0]
        if cache.length > 3:  # after a decode step
            pointers.append({value.data_ptr() for value in cache.binding.get_outputs()})
    assert len(caches) == 1
    cache = caches[0]
    allowed = cache.pointers() | {cache._step_logits.ctypes.data}
    assert all(p <= allowed for p in pointers)
    # Every step writes into the same 2 x 4 KV buffers and one logits array, and nothing else.
    assert set().union(*pointers) == allowed and len(allowed) == 2 * len(decoder.spec.past_names) + 1
    assert cache.length == 3 + 59  # the last token is never fed back


def test_kv_cache_refuses_more_than_its_capacity(exported):
    import numpy as np

    cache = OnnxDecoder(exported).new_cache(1, 4)
    cache.run(np.array([[1, 2, 3]]), np.array([[0, 1, 2]]))
    cache.run(np.array([[4]]), np.array([[3]]))
    with pytest.raises(ConfigError, match="do not fit a KV cache of 4 tokens"):
        cache.run(np.array([[5]]), np.array([[4]]))
