import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from compactgpt.artifacts import save_model
from compactgpt.evaluation import model_logits_fn, perplexity, sliding_windows

from conftest import random_gpt


def hf_sliding_window_nll(model, ids, max_length, stride):
    """The method of transformers' perplexity guide, counting exactly the labels scored."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.double().item() * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("max_length,stride", [(16, 8), (32, 32), (64, 5)])
def test_perplexity_equals_transformers(tmp_path, byte_tokenizer, max_length, stride):
    ours = random_gpt(11)
    save_model(tmp_path / "m", ours, byte_tokenizer, stage="test", settings={})
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 320, (1, 203))
    ref_nll, ref_tokens = hf_sliding_window_nll(hf, ids, max_length, stride)
    result = perplexity(model_logits_fn(ours), ids[0], max_length, stride)
    assert result.tokens == ref_tokens
    assert result.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-4)


def test_windows_score_every_token_but_the_first_exactly_once():
    for n, length, stride in [(100, 16, 8), (17, 32, 4), (1000, 64, 7)]:
        windows = sliding_windows(n, length, stride)
        scored = set()
        for begin, end, n_target in windows:
            n_target = min(n_target, end - begin - 1)
            positions = set(range(end - n_target, end))
            assert not positions & scored
            scored |= positions
        assert scored == set(range(1, n))


def test_non_overlapping_windows_skip_each_window_start_as_transformers_does():
    # stride == max_length: a window's first token has no context in that window, so the
    # reference method leaves it unscored.
    windows = sliding_windows(100, 16, 16)
    scored = set()
    for begin, end, n_target in windows:
        scored |= set(range(end - min(n_target, end - begin - 1), end))
    assert set(range(100)) - scored == {b for b, _, _ in windows}


def test_bad_window_settings():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(lambda x: x, torch.tensor([1]), 16)
