"""The model against transformers' GPT-2: logits, KV cache, padding, generation."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from compactgpt.artifacts import load_model, save_model
from compactgpt.errors import ConfigError
from compactgpt.model import GPTConfig, GPTOutput

from conftest import random_gpt, tiny_config

CONFIGS = [
    dict(),  # MLP width 4 x embedding
    dict(n_inner=48, n_layer=3, n_head=2),  # MLP width != 4 x embedding
    dict(activation_function="gelu", n_embd=48, n_head=3),
]


def hf_from_ours(folder) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("overrides", CONFIGS)
def test_compactgpt_folder_loads_in_transformers_with_equal_logits(tmp_path, byte_tokenizer, overrides):
    ours = random_gpt(1, **overrides)
    save_model(tmp_path / "m", ours, byte_tokenizer, stage="test", settings={})
    hf = hf_from_ours(tmp_path / "m")
    ids = torch.randint(0, 320, (3, 17))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_transformers_folder_loads_in_compactgpt_with_equal_logits(tmp_path, byte_tokenizer, overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=overrides.get("n_inner"), activation_function=cfg.activation_function,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    byte_tokenizer.save(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").model
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    n = byte_tokenizer.vocab_size  # rows past the tokenizer are padding: masked by ours only
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.allclose(logits[..., :n], hf(ids).logits[..., :n], atol=1e-5, rtol=0)
        assert (logits[..., n:] == torch.finfo(logits.dtype).min).all()


def test_kv_cache_and_left_padding_match_transformers(tmp_path, byte_tokenizer):
    ours = random_gpt(3)
    save_model(tmp_path / "m", ours, byte_tokenizer, stage="test", settings={})
    hf = hf_from_ours(tmp_path / "m")
    ids = torch.randint(0, 320, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # second row left-padded by 3
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, past, _, _ = ours(ids, mask, pos, use_cache=True)
        ref = hf(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        real = mask.bool()
        assert torch.allclose(logits[real], ref.logits[real], atol=1e-5)
        # One decode step on top of the cache.
        nxt = torch.randint(0, 320, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos2 = pos[:, -1:] + 1
        step = ours(nxt, mask2, pos2, past, use_cache=True).logits
        ref2 = hf(nxt, attention_mask=mask2, position_ids=pos2, past_key_values=ref.past_key_values)
        assert torch.allclose(step, ref2.logits, atol=1e-5)


def test_incremental_decoding_equals_full_forward():
    model = random_gpt(4)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        parts = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
        # A multi-token chunk on top of a past uses the offset causal mask.
        past = model(ids[:, :5], use_cache=True).past_key_values
        chunk = model(ids[:, 5:12], past_key_values=past, use_cache=True).logits
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert torch.allclose(chunk, full[:, 5:], atol=1e-5)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_matches_transformers_token_for_token(tmp_path, byte_tokenizer, penalty):
    ours = random_gpt(5)
    save_model(tmp_path / "m", ours, byte_tokenizer, stage="test", settings={})
    hf = hf_from_ours(tmp_path / "m")
    prompt = torch.randint(0, 320, (2, 6))
    mine = ours.generate(prompt, 20, repetition_penalty=penalty)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                         attention_mask=torch.ones_like(prompt), pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine, theirs)
    if penalty != 1.0:  # the penalty changed something, so the comparison has teeth
        assert not torch.equal(mine, ours.generate(prompt, 20))


def test_forward_returns_a_gpt_output_whatever_it_is_asked():
    model = random_gpt(9).eval()
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        plain = model(ids)
        cached = model(ids, use_cache=True)
        hidden = model(ids, output_hidden_states=True)
        loss = model(ids, targets=ids)
    assert all(isinstance(out, GPTOutput) for out in (plain, cached, hidden, loss))
    assert plain.past_key_values is None and plain.hidden_states is None and plain.loss is None
    assert len(cached.past_key_values) == model.config.n_layer
    assert len(hidden.hidden_states) == model.config.n_layer + 1
    assert loss.logits is None and loss.loss.shape == ()
    want = torch.nn.functional.cross_entropy(plain.logits.flatten(0, 1), ids.flatten())
    assert torch.allclose(loss.loss, want, atol=1e-5)


def test_batched_left_padded_generation_equals_one_by_one():
    model = random_gpt(6)
    a = torch.randint(1, 320, (1, 7))
    b = torch.randint(1, 320, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, 8, attention_mask=mask)
    assert torch.equal(out[0, 7:], model.generate(a, 8)[0, 7:])
    assert torch.equal(out[1, 7:], model.generate(b, 8)[0, 4:])


def test_generation_stops_at_stop_token():
    model = random_gpt(7)
    prompt = torch.randint(0, 320, (1, 4))
    greedy = model.generate(prompt, 10)
    stop = int(greedy[0, 6])  # the third generated token
    out = model.generate(prompt, 10, stop_tokens=[stop])
    assert out.shape[1] <= 7 and int(out[0, -1]) == stop


def test_context_longer_than_positions_is_a_clear_error():
    model = random_gpt(8)
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_config_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({"n_embd": 64, "n_heads": 4})
