"""A classifier's body has no LM head: the vocabulary-padding mask of its parent must not
touch the hidden states it returns instead."""

import torch

from compactgpt.artifacts import load_model, save_model
from compactgpt.finetune.classify import GPTClassifier

from conftest import random_gpt, winning_padding


def test_a_classifier_body_returns_hidden_states_unmasked(tmp_path, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    save_model(tmp_path / "m", winning_padding(random_gpt(0), n), byte_tokenizer, stage="pretrain", settings={})
    gpt = load_model(tmp_path / "m").model
    assert gpt.vocab_limit == n
    clf = GPTClassifier(gpt, 2).eval()
    assert gpt.vocab_limit is None  # its "logits" are ln_f's hidden states now
    ids = torch.randint(0, n, (2, 6))
    with torch.no_grad():
        hidden = clf.gpt(ids).logits
        assert hidden.shape == (2, 6, gpt.config.n_embd) and hidden.abs().max() < 1e3
        assert clf(ids).shape == (2, 2)
