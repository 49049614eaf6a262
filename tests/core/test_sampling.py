"""The one generation loop (compactgpt.sampling): sampling controls, the repetition penalty
against transformers', and the loop's edge cases with a scripted step function."""

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from compactgpt.errors import ConfigError
from compactgpt.sampling import penalize_repeats, sample_next, stream_tokens

from conftest import random_gpt


def test_sampling_controls():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 1
    # top_k=1 and a tiny top_p both reduce sampling to the argmax.
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    # top_k=2 never picks outside the two best.
    assert {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(100)} <= {1, 3}
    with pytest.raises(ConfigError, match="top_p"):
        sample_next(logits, 1.0, top_p=1.5)


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4  # positive and negative logits
    ids = torch.randint(0, 50, (3, 12), generator=g)  # with repeats within a row
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(penalize_repeats(logits, seen, penalty), want)


class Scripted:
    """A step function that returns the same logits every call and records what it was fed."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.calls = logits, []

    def __call__(self, ids, positions, mask):
        self.calls.append((ids, positions, mask))
        return self.logits.clone()


def test_no_model_call_after_the_last_token_and_positions_follow_the_padding():
    step = Scripted(torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]))
    ids = torch.tensor([[7, 8, 9], [0, 0, 9]]) % 3
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    tokens = list(stream_tokens(step, ids, 4, 64, attention_mask=mask))
    assert len(tokens) == 4 and len(step.calls) == 4  # prefill + 3 decode steps, none after the 4th token
    assert step.calls[0][1].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert step.calls[1][1].tolist() == [[3], [1]]
    assert step.calls[3][2].shape == (2, 6)  # the mask covers past and new tokens


def test_repetition_penalty_counts_prompt_and_generated_tokens_but_not_padding():
    # Token 0 pads row 1; with a strong penalty the loop must walk down the ranking 2, 1, 3...
    step = Scripted(torch.tensor([[1.0, 2.0, 3.0, 0.5], [4.0, 2.0, 3.0, 0.5]]))
    ids = torch.tensor([[2, 2], [0, 1]])
    mask = torch.tensor([[1, 1], [0, 1]])
    tokens = torch.stack(list(stream_tokens(step, ids, 3, 64, attention_mask=mask, repetition_penalty=100.0)), 1)
    assert tokens[0].tolist() == [1, 0, 3]  # 2 is in the prompt
    assert tokens[1].tolist() == [0, 2, 3]  # 0 only pads the prompt: no repeat; 1 is in it


def test_stop_tokens_end_the_stream_and_a_stopped_row_keeps_its_stop_token():
    step = Scripted(torch.tensor([[0.0, 5.0], [5.0, 0.0]]))
    tokens = list(stream_tokens(step, torch.tensor([[0], [0]]), 5, 64, stop_tokens=(1,), repetition_penalty=1.0))
    assert tokens[0].tolist() == [1, 0] and len(step.calls) == 5  # row 1 never stops


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
    (dict(max_new_tokens=70), "exceeds the model's 64 positions"),
    (dict(temperature=-1.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_k=-2), "top_k"),
])
def test_bad_requests_are_refused_before_any_model_call(kwargs, match):
    step = Scripted(torch.zeros(1, 3))
    args = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        next(stream_tokens(step, args.pop("input_ids"), args.pop("max_new_tokens"), 64, **args))
    assert step.calls == []


def test_pytorch_refuses_an_empty_prompt():
    with pytest.raises(ConfigError, match="prompt is empty"):
        random_gpt(1).generate(torch.zeros(1, 0, dtype=torch.long), 3)
