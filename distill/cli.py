"""The `prune`, `sparsify` and `distill` verbs (registered through compactgpt.cli.PLUGINS)."""

from __future__ import annotations

import dataclasses
import sys

from compactgpt.cli import TRAIN_HELP, add_config_args

from .distill import DistillConfig
from .prune import PruneConfig
from .sparsity import SparsityConfig

SHAPE_NOTE = (
    "GPT-2 ties attention width to residual width (n_embd = n_head x head_dim) and pruning keeps the head "
    "width, so heads and embedding channels are pruned together: with 64-wide heads, 4 heads x 64 -> 3 heads "
    "x 64 means n_embd 256 -> 192. Give --heads or --embd (the other follows) or both when they agree."
)

CALIB_HELP = {
    "data": "calibration and evaluation data: a prepared data folder or text (file, folder, glob, JSONL, "
            "@stdlib); default: the data the model was trained on, as its manifest records",
    "text_field": "JSONL field that holds the text",
    "val_fraction": "held-out share of documents when --data is text (perplexity is measured on it)",
    "calib_windows": "calibration windows (random windows of the training split)",
    "block_size": "tokens per calibration window (0: the model's n_positions)",
    "eval_tokens": "validation tokens for perplexity before/after (0: the whole split)",
    "seed": "seed of the calibration windows",
}

PRUNE_HELP = {
    "model": "model folder to prune (the teacher)",
    "out": "folder to write the pruned student to",
    "layers": "transformer blocks to keep (the least important by --depth-metric are removed)",
    "heads": "attention heads to keep per block (sets --embd to heads x head width)",
    "embd": "embedding channels to keep (a multiple of the head width; sets --heads)",
    "mlp": "MLP neurons to keep per block",
    "depth_metric": "block ranking: loss (loss increase when the block is skipped) or cosine "
                    "(1 - cos between the block's input and output)",
    **CALIB_HELP,
}

SPARSIFY_HELP = {
    "model": "model folder to sparsify",
    "out": "folder to write the sparse model to",
    "sparsity": "share of each block projection's weights set to 0 (default 0.5; N:M patterns fix it at 1 - N/M)",
    "method": "weight scores: wanda (|W| x input activation norm, compared per output row) or magnitude "
              "(|W|, compared over the whole matrix)",
    "pattern": "unstructured, or N:M such as 2:4 (keep N of every M consecutive weights; 2:4 runs on "
               "sparse tensor cores of NVIDIA Ampere and later)",
    **CALIB_HELP,
}

DISTILL_HELP = {
    **TRAIN_HELP,
    "teacher": "teacher model folder (frozen; runs next to the student on the same batches)",
    "student": "student: a model folder (e.g. from compactgpt prune or sparsify), or a shape initialised at "
               "random: a JSON file or key=value overrides of the teacher's config, e.g. n_layer=2,n_inner=512",
    "data": "training data: a prepared data folder with the teacher's tokenizer, or text tokenized here "
            "with it; default: the teacher's training data",
    "out": "student folder to write (checkpoints go in OUT/checkpoint)",
    "block_size": "tokens per training window (<= both models' n_positions)",
    "kd_weight": "weight of the divergence between softened teacher and student logits (default 1)",
    "ce_weight": "weight of cross-entropy on the data (default 0); --kd-weight 0 --ce-weight 1 trains "
                 "from scratch without running the teacher",
    "temperature": "softmax temperature of both models in the divergence (scaled by T^2; default 1)",
    "divergence": "forward_kl (KL(teacher||student), mean-seeking; default) or reverse_kl (mode-seeking)",
    "hidden_weight": "weight of the hidden-state loss (normalised MSE after a learned projection to the "
                     "teacher's width; default 0 = off)",
    "eval_batches": "validation windows per evaluation during training",
    "eval_tokens": "validation tokens for the final perplexities (0: the whole split)",
    "val_fraction": "held-out share of documents when --data is text",
    "text_field": "JSONL field that holds the text",
}


def _config(cls, args):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_prune(args) -> None:
    from .prune import prune

    print(prune(_config(PruneConfig, args), log=_log, progress=not args.no_progress))


def cmd_sparsify(args) -> None:
    from .sparsity import sparsify

    print(sparsify(_config(SparsityConfig, args), log=_log, progress=not args.no_progress))


def cmd_distill(args) -> None:
    from .distill import distill

    print(distill(_config(DistillConfig, args), log=_log, progress=not args.no_progress,
                  overwrite=args.overwrite, resume=args.resume))


def register(sub, commands: dict) -> None:
    """Add the prune, sparsify and distill verbs to the compactgpt parser."""
    p = sub.add_parser(
        "prune", help="structured pruning: a smaller GPT-2 sliced from a model",
        description="Rank blocks, attention heads, MLP neurons and embedding channels by their activations "
        "over calibration batches, keep the most important ones, and write a plain GPT-2 folder of the "
        "smaller shape (same count per layer, head width unchanged). Reports perplexity before and right "
        "after pruning; recover quality with `compactgpt distill --student OUT`. " + SHAPE_NOTE)
    add_config_args(p, PruneConfig, PRUNE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands["prune"] = cmd_prune

    p = sub.add_parser(
        "sparsify", help="unstructured or 2:4 sparsity (magnitude or Wanda)",
        description="Set a share of every block projection's weights to 0, chosen by magnitude or by Wanda "
        "(|W| x input activation norm over calibration batches), unstructured or in an N:M pattern. The zeros "
        "are kept through `compactgpt distill --student OUT`. No speed-up on CPUs' dense kernels; 2:4 runs "
        "faster on NVIDIA Ampere+ sparse tensor cores.")
    add_config_args(p, SparsityConfig, SPARSIFY_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands["sparsify"] = cmd_sparsify

    p = sub.add_parser(
        "distill", help="knowledge distillation from a teacher into a student",
        description="Train a student on a frozen teacher's temperature-softened distributions (forward or "
        "reverse KL) mixed with cross-entropy, optionally with a hidden-state loss. The teacher runs next to "
        "the student on the same batches (no stored logits), on the GPU when there is one; launch with "
        "torchrun for several processes. Checkpoints and --resume work as in pretrain. The student's manifest "
        "names the teacher, the pruning plan, the losses and the tokens spent.")
    add_config_args(p, DistillConfig, DISTILL_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing checkpoint in OUT and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to OUT/log.jsonl)")
    commands["distill"] = cmd_distill
