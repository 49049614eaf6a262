"""Distillation losses against hand computations on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import distillation_loss, forward_kl, hidden_state_loss, reverse_kl

# Teacher probabilities (1/2, 1/4, 1/4) and a uniform student, one position.
TEACHER = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
STUDENT = torch.zeros(1, 3)


def test_forward_kl_equals_hand_computation():
    # KL(t || s) = sum t log(t / s) with s = 1/3 everywhere.
    expected = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)
    assert forward_kl(STUDENT, TEACHER, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_forward_kl_at_temperature_two_softens_and_scales_by_t_squared():
    # At T=2 the teacher's probabilities become proportional to sqrt(p): (sqrt(1/2), 1/2, 1/2).
    z = math.sqrt(0.5) + 0.5 + 0.5
    t = [math.sqrt(0.5) / z, 0.5 / z, 0.5 / z]
    expected = 4 * sum(p * math.log(p * 3) for p in t)
    assert forward_kl(STUDENT, TEACHER, 2.0).item() == pytest.approx(expected, abs=1e-6)


def test_reverse_kl_equals_hand_computation():
    # KL(s || t) = sum s log(s / t) with s = 1/3.
    expected = sum((1 / 3) * math.log((1 / 3) / p) for p in (0.5, 0.25, 0.25))
    assert reverse_kl(STUDENT, TEACHER, 1.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_divergence_is_zero_when_student_equals_teacher(divergence, temperature):
    logits = torch.randn(2, 5, 11) * 3
    assert abs(divergence(logits, logits.clone(), temperature).item()) < 1e-6


def test_divergences_are_positive_and_averaged_over_positions():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7, 13), torch.randn(4, 7, 13)
    for fn in (forward_kl, reverse_kl):
        whole = fn(s, t, 1.0)
        per_row = torch.stack([fn(s[i : i + 1], t[i : i + 1], 1.0) for i in range(4)]).mean()
        assert whole.item() > 0 and whole.item() == pytest.approx(per_row.item(), rel=1e-5)


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
    # d/dz KL(t || softmax(z)) = softmax(z) - t at T=1, divided by the number of positions.
    s = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(3, 6)
    forward_kl(s, t, 1.0).backward()
    expected = (F.softmax(s.detach(), -1) - F.softmax(t, -1)) / 3
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_distillation_loss_mixes_weighted_terms():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    y = torch.randint(0, 9, (2, 4))
    total, parts = distillation_loss(s, t, y, kd_weight=0.7, ce_weight=0.3, temperature=2.0)
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten())
    kd = forward_kl(s, t, 2.0)
    assert total.item() == pytest.approx((0.3 * ce + 0.7 * kd).item(), rel=1e-6)
    assert parts["ce"] == pytest.approx(ce.item()) and parts["kd"] == pytest.approx(kd.item())


def test_cross_entropy_only_needs_no_teacher_and_kd_without_teacher_fails():
    s, y = torch.randn(1, 3, 5), torch.randint(0, 5, (1, 3))
    total, parts = distillation_loss(s, None, y, kd_weight=0.0, ce_weight=1.0)
    assert set(parts) == {"ce"} and total.item() == pytest.approx(F.cross_entropy(s[0], y[0]).item())
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(s, None, y, kd_weight=1.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        distillation_loss(s, s, y, kd_weight=1.0, ce_weight=0.0, divergence="js")


def test_hidden_state_loss_is_scale_free():
    t = torch.randn(2, 3, 8) * 5
    assert hidden_state_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_state_loss(torch.zeros_like(t), t).item() == pytest.approx(1.0, rel=1e-6)
    assert hidden_state_loss(torch.zeros_like(t), t * 100).item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="project"):
        hidden_state_loss(torch.zeros(2, 3, 4), t)
