"""Students from a teacher: structured pruning, unstructured / 2:4 sparsity, and knowledge
distillation on CompactGPT's training loop.

    from distill import PruneConfig, prune, DistillConfig, distill, SparsifyConfig, sparsify

    prune(PruneConfig(model="runs/teacher", out="runs/pruned", mlp=256))
    distill(DistillConfig(teacher="runs/teacher", student="runs/pruned", out="runs/student", max_steps=70))
"""

from compactgpt.calibration import CalibrationConfig

from .distill import DistillConfig, distill
from .losses import DIVERGENCES, distillation_loss, forward_kl, hidden_state_loss, reverse_kl
from .prune import PrunePlan, PruneConfig, apply_plan, make_plan, prune, target_shape
from .sparsity import METHODS, SparsifyConfig, sparsify

__all__ = [
    "DistillConfig", "distill", "DIVERGENCES", "distillation_loss", "forward_kl", "reverse_kl",
    "hidden_state_loss", "PrunePlan", "PruneConfig", "apply_plan", "make_plan", "prune", "target_shape",
    "METHODS", "SparsifyConfig", "sparsify", "CalibrationConfig",
]
