"""The `prune`, `sparsify` and `distill` verbs: students made from a teacher (the distill stage)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from compactgpt.config import add_config_args, given_args
from distill import CalibrationConfig, DistillConfig, PruneConfig, SparsifyConfig, distill, prune, sparsify

SHAPE_NOTE = (
    "GPT-2 ties attention width to residual width (n_embd = n_head x head_dim) and pruning keeps the head "
    "width, so heads and embedding channels are pruned together: with 64-wide heads, 4 heads x 64 -> 3 heads "
    "x 64 means n_embd 256 -> 192. Give --heads or --embd (the other follows) or both when they agree."
)


def _log(message: str) -> None:
    # stdout carries only the folder written, so scripts can capture it; progress goes to stderr.
    print(message, file=sys.stderr)


def _add_stage_args(parser: argparse.ArgumentParser, cls: type, description: str) -> None:
    parser.description = description
    if issubclass(cls, CalibrationConfig):
        # The stage's own flags first, then the calibration settings every calibrated stage shares.
        shared = tuple(f.name for f in dataclasses.fields(CalibrationConfig) if f.name not in ("model", "out"))
        add_config_args(parser, cls, skip=shared)
        add_config_args(parser.add_argument_group("calibration and evaluation"), CalibrationConfig,
                        skip=("model", "out"))
    else:
        add_config_args(parser, cls)


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `compactgpt prune`: one per PruneConfig field."""
    _add_stage_args(parser, PruneConfig, (
        "Rank blocks, attention heads, MLP neurons and embedding channels by their activations over calibration "
        "batches, keep the most important ones, and write a plain GPT-2 folder of the smaller shape (same count "
        "per layer, head width unchanged). Reports perplexity before and right after pruning; recover quality "
        "with `compactgpt distill --student OUT`. " + SHAPE_NOTE))


def _run_stage(stage, cls: type, args: argparse.Namespace) -> None:
    # Build the config from the flags given, run, print the folder written.
    print(stage(cls(**given_args(args, cls)), log=_log))


def run_prune(args: argparse.Namespace) -> None:
    """Prune as the flags say; prints the student's folder."""
    _run_stage(prune, PruneConfig, args)


def add_sparsify_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `compactgpt sparsify`: one per SparsifyConfig field."""
    _add_stage_args(parser, SparsifyConfig, (
        "Set a share of every block projection's weights to 0, chosen by magnitude or by Wanda (|W| x input "
        "activation norm over calibration batches), unstructured or in an N:M pattern. The zeros are kept "
        "through `compactgpt distill --student OUT`. No speed-up on CPUs' dense kernels; 2:4 runs faster on "
        "NVIDIA Ampere+ sparse tensor cores."))


def run_sparsify(args: argparse.Namespace) -> None:
    """Sparsify as the flags say; prints the sparse model's folder."""
    _run_stage(sparsify, SparsifyConfig, args)


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `compactgpt distill`: one per DistillConfig field."""
    _add_stage_args(parser, DistillConfig, (
        "Train a student on a frozen teacher's temperature-softened distributions (forward or reverse KL) "
        "mixed with cross-entropy, optionally with a hidden-state loss. The teacher runs next to the student "
        "on the same batches (no stored logits), on the GPU when there is one; launch with torchrun for several "
        "processes. Checkpoints and --resume work as in pretrain. The student's manifest names the teacher, "
        "the pruning plan, the losses and the tokens spent."))


def run_distill(args: argparse.Namespace) -> None:
    """Distill as the flags say; prints the student's folder."""
    _run_stage(distill, DistillConfig, args)
