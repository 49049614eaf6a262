import pytest
from transformers import AutoTokenizer

from compactgpt.errors import ArtifactError, DataError
from compactgpt.tokenizer import EOT, Tokenizer, train_bpe

TEXT = "def naïve(x):\n    return x  # ünïcödé ✓ 🚀\n"


def test_bpe_round_trips_any_text_and_has_the_separator():
    tok = train_bpe([TEXT] * 50, vocab_size=300)
    assert tok.vocab_size <= 300
    assert tok.decode(tok.encode(TEXT)) == TEXT
    unseen = "完全に未知のテキスト \x00\x7f"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte fallback: nothing is unknown
    assert tok.decode([tok.eot_id]) == EOT


def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path):
    tok = train_bpe([TEXT] * 50, vocab_size=300)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT)
    assert hf.eos_token == EOT


def test_gpt2_vocab_and_merges_folder_loads(tmp_path):
    tok = train_bpe([TEXT] * 50, vocab_size=300)
    # Write the GPT-2 style pair of files from the trained model.
    tok._tok.model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.eot_id == tok.eot_id


def test_missing_or_damaged_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="has no tokenizer"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="could not be read"):
        Tokenizer.from_folder(tmp_path)


def test_tiny_vocab_is_refused():
    with pytest.raises(DataError, match="at least 258"):
        train_bpe([TEXT], vocab_size=100)
