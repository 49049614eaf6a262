"""The training loss computed chunk by chunk equals the plain one, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compactgpt.model import GPT, linear_cross_entropy

from conftest import tiny_config


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_matches_cross_entropy_of_full_logits(chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (50,), generator=g)
    targets[[3, 10, 11]] = -100  # positions that are not scored (prompt, padding)

    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(got[0], reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], weight.grad, rtol=1e-4, atol=1e-6)


def test_gpt_forward_with_targets_trains_like_full_logits():
    """Through the model, tied embedding included: same loss, same gradient on every parameter."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 300, (3, 20))
    y = torch.randint(0, 300, (3, 20))
    model(x, targets=y).loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
