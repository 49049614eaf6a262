"""Embedding rows past the tokenizer's vocabulary (padding to a multiple of 64) never win:
not in generation, not in perplexity or KL, and the folder stays a transformers GPT-2 folder.

The fixture model's padding rows are made to dominate every position, so each test would
fail if the mask were missing (the first test checks that they do dominate unmasked)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from compactgpt.artifacts import load_model, save_model
from compactgpt.evaluation import compare_models, model_logits_fn, perplexity
from compactgpt.model import mask_padded_vocab

from conftest import random_gpt, winning_padding

ROWS = 320  # tiny_config's vocab_size: the tokenizer (280 tokens) padded up


@pytest.fixture
def padded_folder(tmp_path, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    assert n < ROWS
    save_model(tmp_path / "m", winning_padding(random_gpt(0), n), byte_tokenizer, stage="pretrain", settings={})
    return tmp_path / "m"


def test_padding_rows_would_win_unmasked_and_never_do_once_loaded(padded_folder, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    loaded = load_model(padded_folder)
    assert loaded.model.vocab_limit == n
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    raw = load_model(padded_folder).model.limit_vocab(None)
    assert (raw.generate(ids, 10)[:, 4:] >= n).all()  # the fixture is honest: padding wins unmasked
    assert (loaded.model.generate(ids, 10)[:, 4:] < n).all()
    for kw in (dict(temperature=1.0), dict(temperature=0.5, top_k=50), dict(temperature=2.0, top_p=0.99)):
        out = loaded.model.generate(ids, 16, generator=torch.Generator().manual_seed(0), **kw)
        assert (out[:, 4:] < n).all(), kw


def test_perplexity_equals_perplexity_over_the_real_vocabulary(padded_folder, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    model = load_model(padded_folder).model
    raw = load_model(padded_folder).model.limit_vocab(None).eval()
    tokens = torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(1))
    got = perplexity(model_logits_fn(model), tokens, max_length=64, stride=32)
    want = perplexity(lambda ids: raw(ids).logits[..., :n], tokens, max_length=64, stride=32)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-6)
    with torch.no_grad():  # the padding would have taken nearly all the mass
        unmasked_nll = F.cross_entropy(raw(tokens[None, :64]).logits[0, :-1], tokens[1:64]).item()
    assert unmasked_nll > got.nll + 10


def test_kl_and_agreement_only_see_the_real_vocabulary(padded_folder, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    a = load_model(padded_folder).model
    b = load_model(padded_folder).model
    with torch.no_grad():
        b.transformer.h[0].mlp.c_fc.weight.mul_(1.5)  # another model, same padding
    tokens = torch.randint(0, n, (150,), generator=torch.Generator().manual_seed(2))
    got = compare_models(model_logits_fn(a), model_logits_fn(b), tokens, max_length=64)
    sliced = lambda m: (lambda ids: m(ids).logits[..., :n])  # noqa: E731
    want = compare_models(sliced(a), sliced(b), tokens, max_length=64)
    assert all(math.isfinite(v) for v in (got.kl_mean, got.kl_p99, got.perplexity))
    assert got.kl_mean == pytest.approx(want.kl_mean, rel=1e-5, abs=1e-9)
    assert got.top1_agreement == want.top1_agreement
    assert compare_models(model_logits_fn(a), model_logits_fn(a), tokens, max_length=64).kl_mean == 0.0


def test_masked_logits_keep_their_shape_and_take_the_lowest_finite_value():
    logits = torch.randn(2, 3, 8)
    out = mask_padded_vocab(logits, 5)
    assert out.shape == logits.shape and torch.equal(out[..., :5], logits[..., :5])
    assert (out[..., 5:] == torch.finfo(torch.float32).min).all() and torch.isfinite(out).all()
    assert torch.equal(mask_padded_vocab(logits.half(), 5)[..., 5:], torch.full((2, 3, 3), -65504.0).half())
    assert mask_padded_vocab(logits, 8) is logits


def test_training_mode_leaves_the_padding_rows_alone():
    # Training never builds masked logits: no target is a padding id, and the fused loss
    # (GPT.forward's targets) computes the same value as the logits path.
    model = random_gpt(0).limit_vocab(300)
    ids = torch.randint(0, 300, (2, 8))
    model.train()
    assert (model(ids).logits[..., 300:] > torch.finfo(torch.float32).min).all()
    model.eval()
    assert (model(ids).logits[..., 300:] == torch.finfo(torch.float32).min).all()


def test_limit_vocab_checks_its_count():
    model = random_gpt(0)
    assert model.limit_vocab(ROWS).vocab_limit is None  # every row is a token: nothing to mask
    for bad in (0, ROWS + 1, 3.5, True):
        with pytest.raises(ValueError, match="limit_vocab"):
            model.limit_vocab(bad)


def test_padded_folder_still_loads_in_transformers(padded_folder, byte_tokenizer):
    n = byte_tokenizer.vocab_size
    hf = GPT2LMHeadModel.from_pretrained(padded_folder, attn_implementation="eager").eval()
    assert hf.config.vocab_size == ROWS
    ours = load_model(padded_folder).model
    ids = torch.randint(0, n, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits[..., :n], hf(ids).logits[..., :n], atol=1e-5, rtol=0)
