import json

import numpy as np
import pytest
import torch

from compactgpt.data import (STDLIB, DataConfig, Document, TokenShards, decode_text, prepare_data,
                             read_documents, split_documents)
from compactgpt.errors import DataError


def test_folder_glob_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("print('b')\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs, stats = read_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a.txt", "sub/b.py"]  # binary suffixes skipped
    docs, _ = read_documents(str(tmp_path / "**" / "*.py"))
    assert len(docs) == 1 and docs[0].text == "print('b')\n"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "three"}) + "\n")
    docs, _ = read_documents(str(rows))
    assert [d.text for d in docs] == ["one", "three"]


def test_jsonl_row_without_the_field_names_the_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2 has no 'text' field"):
        read_documents(str(rows))


def test_missing_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        read_documents(str(tmp_path / "d"))
    with pytest.raises(DataError, match="matches no files"):
        read_documents(str(tmp_path / "*.md"))


def test_undecodable_bytes_are_counted_replaced_and_reported(tmp_path):
    text, bad = decode_text(b"ok \xff\xfe done \xc3\xa9")
    assert bad == 2 and text == "ok \ufffd\ufffd done é"
    (tmp_path / "a.txt").write_bytes(b"line one\nbad \xff byte\n" * 20)
    (tmp_path / "b.txt").write_bytes(b"clean text\n" * 20)
    messages = []
    out = prepare_data(DataConfig(source=str(tmp_path), vocab_size=260, val_fraction=0.5, out=str(tmp_path / "out")),
                       log=messages.append)
    assert any("20 undecodable byte(s) in 1 file(s)" in m for m in messages)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["replaced_bytes"] == 20


def test_split_is_by_document_deterministic_and_order_free():
    docs = [Document(f"file_{i}.py", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.name for d in val} == {d.name for d in val2}
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    assert not {d.name for d in train} & {d.name for d in val}


def test_single_document_is_split_at_a_line_boundary():
    doc = Document("play.txt", "".join(f"line {i}\n" for i in range(100)))
    train, val = split_documents([doc], 0.1)
    assert train[0].text + val[0].text == doc.text
    assert val[0].text.startswith("line 90\n")


def test_prepared_shards_hold_documents_separated_by_eot(data_dir, tokenizer):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["stage"] == "data" and manifest["extra"]["dtype"] == "uint16"
    train = TokenShards(data_dir, "train").all_tokens()
    n_docs = manifest["metrics"]["train_documents"]
    assert int((train == tokenizer.eot_id).sum()) == n_docs
    first = tokenizer.decode(train[: int(np.argmax(train == tokenizer.eot_id))].tolist())
    assert first.startswith("def ")
    m = manifest["metrics"]
    assert m["train_tokens"] == len(train) and m["unigram_val_perplexity"] > 1


def test_random_windows_are_reproducible_from_the_generator_state(data_dir):
    shards = TokenShards(data_dir, "train")
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    x1, y1 = shards.sample(4, 16, g)
    g.set_state(state)
    x2, y2 = shards.sample(4, 16, g)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


def test_uint32_when_vocab_exceeds_uint16():
    from compactgpt.data import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_stdlib_default_corpus_is_present_and_holds_library_code():
    docs, stats = read_documents(STDLIB)
    names = {d.name for d in docs}
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) for n in names)
    assert stats.documents > 100


def test_jsonl_text_field_option(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "two"}) + "\n")
    docs, _ = read_documents(str(rows), text_field="body")
    assert [d.text for d in docs] == ["two"]


def test_the_tokenize_stage_takes_one_config_and_saves_no_run_setting(tmp_path, corpus_dir):
    """prepare_data(config) -> the folder: where it writes, whose tokenizer it reuses and whether
    it may replace an artifact are fields of DataConfig that stay out of the manifest."""
    from compactgpt.artifacts import read_manifest
    from compactgpt.errors import ConfigError
    from compactgpt.tokenizer import Tokenizer

    config = DataConfig(source=str(corpus_dir), vocab_size=280, val_fraction=0.2, out=str(tmp_path / "a"))
    first = prepare_data(config, log=lambda m: None)
    assert first == tmp_path / "a"
    saved = read_manifest(first).settings
    assert sorted(saved) == ["shard_tokens", "source", "text_field", "val_fraction", "vocab_size"]
    again = prepare_data(config.replace(out=str(tmp_path / "b"), tokenizer=str(first)), log=lambda m: None)
    assert Tokenizer.from_folder(again).to_json() == Tokenizer.from_folder(first).to_json()
    assert read_manifest(again).settings == saved
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_data(config.replace(source=str(corpus_dir)), log=lambda m: None)
    assert prepare_data(config.replace(overwrite=True), log=lambda m: None) == first
    with pytest.raises(ConfigError, match="--out"):
        prepare_data(config.replace(out=""), log=lambda m: None)
