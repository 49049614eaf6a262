"""Knowledge-distillation losses: pure functions of logits and hidden states.

Conventions: logits are (..., V); every loss is a mean over token positions, so it does not
depend on batch size or sequence length. Divergences are taken between temperature-softened
distributions and multiplied by T**2 (Hinton et al., 2015): the gradient of a softened KL
shrinks as 1/T**2, and the factor keeps the KD term on the same scale as cross-entropy
whatever temperature is chosen.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T**2 * KL(teacher || student) per position, averaged: sum_v p_t (log p_t - log p_s).

    Mean-seeking: the student is pushed to cover every token the teacher gives mass to. The
    classic distillation objective (DistilBERT, DistilGPT2, Minitron)."""
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T**2 * KL(student || teacher) per position, averaged: sum_v p_s (log p_s - log p_t).

    Mode-seeking: the student may drop low-probability teacher modes rather than smear mass
    over them (MiniLLM); useful when the student is much smaller than the teacher."""
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return kl.mean() * temperature**2


# The divergences --divergence accepts; a new one is a function of the same signature.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
}


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (projected) student and teacher hidden states, divided by
    the teacher's mean square: scale-free, so layers with large activations do not dominate.
    0 when they are equal, 1 when the student outputs zeros."""
    s, t = student_hidden.float(), teacher_hidden.float()
    if s.shape != t.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}; "
            "project the student's states to the teacher's width first"
        )
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    kd_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    hidden_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
    hidden_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ce_weight * CE(student, targets) + kd_weight * divergence(student, teacher)
    + hidden_weight * mean hidden_state_loss over hidden_pairs.

    Returns the total and its parts (as floats, for logging). A term whose weight is 0 is not
    computed, so a plain cross-entropy run needs no teacher logits.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    if ce_weight:
        ce = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten())
        total = total + ce_weight * ce
        parts["ce"] = float(ce.detach())
    if kd_weight:
        if teacher_logits is None:
            raise ValueError("kd_weight > 0 needs the teacher's logits")
        kd = DIVERGENCES[divergence](student_logits, teacher_logits, temperature)
        total = total + kd_weight * kd
        parts["kd"] = float(kd.detach())
    if hidden_weight and hidden_pairs:
        hid = torch.stack([hidden_state_loss(s, t) for s, t in hidden_pairs]).mean()
        total = total + hidden_weight * hid
        parts["hidden"] = float(hid.detach())
    return total, parts
