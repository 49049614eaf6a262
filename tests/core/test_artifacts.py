import json
from pathlib import Path

import pytest
import torch

from compactgpt.artifacts import INCOMPLETE, folder_hash, load_model, read_manifest, save_model
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.tokenizer import train_bpe

from conftest import random_gpt


def saved(tmp_path, tok, **kw):
    model = random_gpt(0, **kw)
    save_model(tmp_path / "m", model, tok, stage="pretrain", settings={"lr": 1e-3}, metrics={"val_perplexity": 9.5})
    return model, tmp_path / "m"


def test_round_trip_keeps_logits_and_records_the_manifest(tmp_path, byte_tokenizer):
    model, folder = saved(tmp_path, byte_tokenizer)
    loaded = load_model(folder)
    # The loaded model learns from its tokenizer which embedding rows are padding (masked).
    assert loaded.model.vocab_limit == byte_tokenizer.vocab_size < 320
    model.limit_vocab(byte_tokenizer.vocab_size)
    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    m = loaded.manifest
    assert m.stage == "pretrain" and m.settings == {"lr": 1e-3} and m.metrics["val_perplexity"] == 9.5
    assert set(m.files) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert "torch" in m.versions and not (folder / INCOMPLETE).exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_inner"] == 128



def test_manifest_stores_absolute_setting_paths_relative_to_the_folder(tmp_path, byte_tokenizer):
    """No directory of the machine that wrote it in the file; the paths still hold after the run
    folder moves as a whole."""
    from compactgpt.artifacts import update_metrics

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    settings = {"data": str((run / "data").absolute()), "out": str((run / "teacher").absolute()),
                "source": "@stdlib", "typed": "runs/data", "lr": 1e-3}
    save_model(run / "teacher", random_gpt(0), byte_tokenizer, stage="pretrain", settings=settings)
    update_metrics(run / "teacher", {"val_perplexity": 9.5})  # rewrites the manifest the same way
    raw = json.loads((run / "teacher" / "manifest.json").read_text())
    assert str(tmp_path) not in json.dumps(raw)
    assert raw["settings"] == {**settings, "data": "../data", "out": "."}
    assert read_manifest(run / "teacher").settings == settings
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    m = read_manifest(moved / "teacher")
    assert m.settings["data"] == str(moved / "data") and Path(m.settings["data"]).is_dir()
    assert m.settings["typed"] == "runs/data" and m.metrics["val_perplexity"] == 9.5

def test_parent_is_recorded_with_its_hash(tmp_path, byte_tokenizer):
    _, parent = saved(tmp_path, byte_tokenizer)
    save_model(tmp_path / "child", random_gpt(1), byte_tokenizer, stage="finetune", settings={}, parent=parent)
    child = read_manifest(tmp_path / "child")
    assert child.parent["sha256"] == folder_hash(parent)


def test_truncated_weights_are_a_clear_error(tmp_path, byte_tokenizer):
    _, folder = saved(tmp_path, byte_tokenizer)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_model(folder)
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        load_model(folder, verify=False)


def test_edited_weights_fail_the_hash_check(tmp_path, byte_tokenizer):
    _, folder = saved(tmp_path, byte_tokenizer)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_model(folder)


def test_interrupted_write_never_loads(tmp_path, byte_tokenizer):
    _, folder = saved(tmp_path, byte_tokenizer)
    (folder / INCOMPLETE).write_text("")
    with pytest.raises(ArtifactError, match="interrupted while being written"):
        load_model(folder)


def test_folder_that_is_not_an_artifact(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="not a model artifact: it has no config.json"):
        load_model(tmp_path / "x")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_pickled_weights_are_refused(tmp_path, byte_tokenizer):
    _, folder = saved(tmp_path, byte_tokenizer)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="never loads"):
        load_model(folder, verify=False)


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path):
    big = train_bpe([f"word{i} " for i in range(3000)], vocab_size=600)
    assert big.vocab_size > 320
    with pytest.raises(ConfigError, match="vocab_size is 320"):
        save_model(tmp_path / "m", random_gpt(0), big, stage="t", settings={})
    small = train_bpe(["ab cd"] * 10, vocab_size=280)
    save_model(tmp_path / "m", random_gpt(0), small, stage="t", settings={})
    big.save(tmp_path / "m")  # a tokenizer from another model dropped into the folder
    with pytest.raises(ConfigError, match="belongs to another model"):
        load_model(tmp_path / "m", verify=False)


def test_unsupported_gpt2_variants_are_refused(tmp_path, byte_tokenizer):
    _, folder = saved(tmp_path, byte_tokenizer)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="scale_attn_by_inverse_layer_idx"):
        load_model(folder, verify=False)


def test_model_spec_resolves_local_folders_and_reports_unreachable_hub_ids(tmp_path, byte_tokenizer, monkeypatch):
    from compactgpt.artifacts import resolve_model_path

    _, folder = saved(tmp_path, byte_tokenizer)
    assert resolve_model_path(str(folder)) == folder
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_model_path("./no/such/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ArtifactError, match="neither a local folder nor a model that could be fetched"):
        resolve_model_path("someone/missing-model")
