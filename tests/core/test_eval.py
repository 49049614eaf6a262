import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from compactgpt.artifacts import save_model
from compactgpt.evaluation import compare_models, model_logits_fn, perplexity, sliding_windows

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


def test_compare_with_itself_is_zero_and_matches_perplexity():
    model = random_gpt(5)
    ids = torch.randint(0, 320, (150,))
    fn = model_logits_fn(model)
    r = compare_models(fn, fn, ids, 32, 12)
    ppl = perplexity(fn, ids, 32, 12)
    assert r.kl_mean == 0 and r.kl_p99 == 0 and r.top1_agreement == 1.0
    assert r.tokens == ppl.tokens
    assert math.isclose(r.perplexity, ppl.perplexity, rel_tol=1e-12)
    assert math.isclose(r.reference_perplexity, ppl.perplexity, rel_tol=1e-12)


def test_compare_kl_equals_a_hand_computation():
    torch.manual_seed(0)
    vocab = 7
    table_p, table_q = torch.randn(vocab, vocab), torch.randn(vocab, vocab)
    # Each model's logits at a position depend only on that position's token.
    model_p = lambda ids: table_p[ids]
    model_q = lambda ids: table_q[ids]
    ids = torch.randint(0, vocab, (40,))
    r = compare_models(model_q, model_p, ids, 40, 40)  # one window: positions 0..38 predict tokens 1..39
    p = torch.softmax(table_p[ids[:-1]], -1)
    q = torch.softmax(table_q[ids[:-1]], -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert r.tokens == 39
    assert math.isclose(r.kl_mean, expected.mean().item(), rel_tol=1e-5)
    assert math.isclose(r.kl_median, expected.double().median().item(), rel_tol=1e-5)
    assert r.top1_agreement == int((p.argmax(-1) == q.argmax(-1)).sum()) / 39


def test_eval_scores_quantized_folders_against_a_reference(tmp_path, byte_tokenizer, capsys):
    import json

    from compactgpt.app.cli import main
    from quantize import RTNConfig, quantize_, save_quantized

    model = random_gpt(3)
    save_model(tmp_path / "fp", model, byte_tokenizer, stage="test", settings={})
    quantize_(model, RTNConfig(bits=4, group_size=16, symmetric=False))
    save_quantized(tmp_path / "q", model, byte_tokenizer, RTNConfig(bits=4, group_size=16, symmetric=False),
                   parent=tmp_path / "fp")
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    args = ["eval", "--model", str(tmp_path / "q"), "--data", str(text), "--max-length", "32", "--json"]
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(args + ["--reference", str(tmp_path / "fp")]) == 0
    both = json.loads(capsys.readouterr().out)
    assert math.isclose(both["perplexity"], alone["perplexity"], rel_tol=1e-9)
    assert both["kl_mean"] > 0 and 0 < both["top1_agreement"] <= 1
    assert main(["eval", "--model", str(tmp_path / "fp"), "--data", str(text), "--max-length", "32", "--json"]) == 0
    assert math.isclose(both["reference_perplexity"], json.loads(capsys.readouterr().out)["perplexity"], rel_tol=1e-9)


def test_eval_refuses_a_reference_with_another_tokenizer(tmp_path, byte_tokenizer, tokenizer, capsys):
    from compactgpt.app.cli import main

    save_model(tmp_path / "a", random_gpt(1), byte_tokenizer, stage="test", settings={})
    other = random_gpt(2, vocab_size=tokenizer.vocab_size)
    save_model(tmp_path / "b", other, tokenizer, stage="test", settings={})
    text = tmp_path / "text.txt"
    text.write_text("x = 1\n" * 50)
    rc = main(["eval", "--model", str(tmp_path / "a"), "--reference", str(tmp_path / "b"), "--data", str(text),
               "--json"])
    assert rc == 2 and "different tokenizer" in capsys.readouterr().err


def test_scoring_moves_token_ids_to_the_models_device():
    """A model on another device than the token ids (a GPU in practice) is scored without a
    device error. The `meta` device stands in for the GPU: it has shapes but no values, so
    only reading the final number may fail, and it must fail for that reason alone."""
    from compactgpt.evaluation import window_nll
    from compactgpt.model import GPT

    from conftest import tiny_config

    logits = torch.randn(5, 11, device="meta")
    nll = window_nll(logits, torch.tensor([1, 2, 3, 4, 5]))  # targets read on the CPU
    assert nll.device.type == "meta" and nll.shape == () and nll.dtype == torch.float64

    model = GPT(tiny_config()).to("meta")
    tokens = torch.randint(0, 300, (100,))
    for score in (lambda: perplexity(model_logits_fn(model), tokens, 32),
                  lambda: compare_models(model_logits_fn(model), model_logits_fn(model), tokens, 32)):
        with pytest.raises((RuntimeError, NotImplementedError)) as raised:
            score()
        message = str(raised.value)
        assert "meta" in message and "expected device" not in message and "same device" not in message
