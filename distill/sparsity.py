"""Unstructured and N:M (2:4) sparsity of the block projections, by magnitude or Wanda.

Scores (pure functions): magnitude |W|; Wanda (Sun et al., 2023) |W_ij| * ||X_j||_2, the
weight times the norm of its input feature over calibration tokens, which keeps small
weights that multiply large activations. Masks (pure functions): unstructured at a target
sparsity, compared per output row (Wanda's choice) or over the whole matrix; or N:M, keeping
the N largest of every M consecutive weights of a row (2:4 is what NVIDIA's sparse tensor
cores run). The four projections of every block are sparsified; embeddings, LayerNorms and
the tied LM head stay dense, as in Wanda and SparseGPT.

A sparse artifact stores its zeros in an ordinary dense GPT-2 folder. `compactgpt distill`
reads the manifest's sparsity record and holds the zeros through recovery training (gradient
and weight masking), so the pattern survives fine-tuning.

Speed: none on a CPU, whose dense kernels multiply zeros like any number. 2:4 runs faster
matmuls on NVIDIA Ampere and later GPUs through semi-structured sparse kernels
(torch.sparse.to_sparse_semi_structured / cuSPARSELt); unstructured sparsity pays off only in
sparse-aware runtimes at high sparsity, or as smaller compressed files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from compactgpt.artifacts import load_model, parent_record, resolve_model_path, save_model
from compactgpt.calibration import CalibrationConfig, calibration_windows, data_tokens
from compactgpt.config import option, run_option
from compactgpt.device import cpu_threads, resolve_device
from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.outputs import claim_output

from .importance import block_linears, collect_stats
from .prune import CALIBRATION_BATCH, eval_perplexity

# ---------------------------------------------------------------------------------------
# Pure scores and masks


def magnitude_scores(weight: torch.Tensor, input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """|W|: the weight alone decides."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a Linear weight (out, in) and input-column norms (in,)."""
    if input_norms.shape != weight.shape[1:]:
        raise ValueError(f"input norms {tuple(input_norms.shape)} do not match the weight's {weight.shape[1]} inputs")
    return weight.detach().abs().float() * input_norms.float()[None, :]


@dataclass(frozen=True)
class Method:
    score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_activations: bool
    per_row: bool  # compare scores within each output row (else over the whole matrix)


# --method: how weights are scored and which weights compete for the kept places.
METHODS: dict[str, Method] = {
    "magnitude": Method(magnitude_scores, needs_activations=False, per_row=False),
    "wanda": Method(wanda_scores, needs_activations=True, per_row=True),
}


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Bool mask keeping all but the floor(sparsity * n) lowest scores, n counted per row or
    over the whole matrix. Ties are broken by position, so the count is exact."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = scores if per_row else scores.reshape(1, -1)
    n_drop = int(math.floor(sparsity * flat.shape[1]))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_drop:
        drop = torch.argsort(flat, dim=1, stable=True)[:, :n_drop]
        mask.scatter_(1, drop, False)
    return mask.reshape(scores.shape)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n highest scores in each group of m consecutive inputs of a row."""
    rows, cols = scores.shape
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    if cols % m:
        raise ConfigError(f"a layer with {cols} inputs cannot hold an {n}:{m} pattern ({cols} is not a multiple of {m})")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"--pattern {pattern!r} is not 'unstructured' or N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise ConfigError(f"--pattern {pattern}: an N:M pattern needs 0 < N < M (e.g. 2:4)")
    return n, m


# ---------------------------------------------------------------------------------------
# Masks on a model


def compute_masks(model: GPT, method: str, sparsity: float, pattern: str,
                  input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Linear name -> bool mask (out, in) for every block projection."""
    m = METHODS[method]
    nm = parse_pattern(pattern)
    masks = {}
    for name, lin in block_linears(model).items():
        norms = input_norms[name] if m.needs_activations else None
        scores = m.score(lin.weight, norms)
        masks[name] = n_m_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, m.per_row)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Zero the masked-out weights in place (names relative to the GPT, under `prefix`)."""
    for name, mask in masks.items():
        w = model.get_submodule(prefix + name).weight
        w.mul_(mask.to(w.device, w.dtype))


def masks_from_zeros(model: GPT) -> dict[str, torch.Tensor]:
    """The masks a sparse artifact implies: True where a block projection's weight is not 0."""
    return {name: lin.weight.detach() != 0 for name, lin in block_linears(model).items()}


def sparsity_report(model: GPT) -> dict:
    """Share of zero weights in the block projections (overall and per layer kind)."""
    zeros, total, per_kind = 0, 0, {}
    for name, lin in block_linears(model).items():
        z, n = int((lin.weight == 0).sum()), lin.weight.numel()
        zeros, total = zeros + z, total + n
        kind = name.split(".", 3)[3]
        a, b = per_kind.get(kind, (0, 0))
        per_kind[kind] = (a + z, b + n)
    return {"sparsity": zeros / max(total, 1), "zero_weights": zeros, "prunable_weights": total,
            "sparsity_by_kind": {k: a / b for k, (a, b) in per_kind.items()}}


class MaskKeeper:
    """Holds masks through training: gradients of pruned weights are zeroed as they are
    computed (so AdamW's moments stay 0 there), and weights are re-masked after every
    optimizer step (so weight decay or numerical drift cannot revive them)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], prefix: str = ""):
        self.model, self.prefix = model, prefix
        self.masks = dict(masks)
        self.handles = []
        for name in masks:
            w = model.get_submodule(prefix + name).weight
            self.handles.append(w.register_hook(lambda g, name=name: g * self._mask(name, g)))

    def _mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        # Moved once to the training device, then reused every step.
        mask = self.masks[name]
        if mask.device != like.device or mask.dtype != like.dtype:
            mask = self.masks[name] = mask.to(like.device, like.dtype)
        return mask

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        for name in self.masks:
            w = self.model.get_submodule(self.prefix + name).weight
            w.mul_(self._mask(name, w))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class SparsifyConfig(CalibrationConfig):
    """Settings of the sparsify stage; one CLI flag per field; saved in the artifact."""

    model: str = option("", "model folder to sparsify")
    out: str = option("", "folder to write the sparse model to")
    sparsity: float | None = option(None, "share of each block projection's weights set to 0 (default 0.5; N:M "
                                    "patterns fix it at 1 - N/M)")
    method: str = option("wanda", "weight scores: wanda (|W| x input activation norm, compared per output row) "
                         "or magnitude (|W|, compared over the whole matrix)")
    pattern: str = option("unstructured", "unstructured, or N:M such as 2:4 (keep N of every M consecutive "
                          "weights; 2:4 runs on sparse tensor cores of NVIDIA Ampere and later)")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    overwrite: bool = run_option("overwrite")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress")

    def validate(self) -> None:
        if not self.model or not self.out:
            raise ConfigError("--model and --out are required")
        super().validate()
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is unknown; choose one of {sorted(METHODS)}")
        nm = parse_pattern(self.pattern)
        if self.sparsity is None:
            return
        if nm is None and not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if nm is not None and not math.isclose(self.sparsity, 1 - nm[0] / nm[1]):
            raise ConfigError(
                f"--pattern {self.pattern} is {1 - nm[0] / nm[1]:.0%} sparse by construction, but --sparsity is "
                f"{self.sparsity}; drop --sparsity or pass --sparsity {1 - nm[0] / nm[1]}"
            )

    def target(self) -> float:
        """The sparsity asked for: --sparsity, else 1 - N/M for an N:M pattern, else 0.5."""
        if self.sparsity is not None:
            return self.sparsity
        nm = parse_pattern(self.pattern)
        return 1 - nm[0] / nm[1] if nm else 0.5

    def to_dict(self) -> dict:
        return {**super().to_dict(), "sparsity": self.target()}


def sparsify(config: SparsifyConfig, log: Callable[[str], None] = print) -> Path:
    """Zero config.sparsity of every block projection of config.model and write the result.

    Returns the folder. The manifest records the method, the pattern, the sparsity reached and
    the perplexity before and after. Raises ConfigError, before any work, for an --out that
    claim_output refuses (the model folder or a folder above it, another artifact without
    config.overwrite, a run already writing it)."""
    config.validate()
    with cpu_threads(config.threads), claim_output(config.out, stage="sparsify", overwrite=config.overwrite,
                                                   inputs={"--model": config.model, "--data": config.data}):
        return _sparsify(config, log)


def _sparsify(config: SparsifyConfig, log: Callable[[str], None]) -> Path:
    source = resolve_model_path(config.model)
    loaded = load_model(source, device=resolve_device(config.device))  # save_model writes CPU copies
    model = loaded.model
    tokens = data_tokens(config.data, loaded, config.text_field, config.val_fraction)
    norms = None
    if METHODS[config.method].needs_activations:
        batches = list(calibration_windows(tokens.train, config.calib_samples, config.calib_seq_len,
                                           model.config.n_positions, config.seed).split(CALIBRATION_BATCH))
        stats = collect_stats(model, batches, linear_inputs=True, progress=config.progress)
        norms = {name: stats.input_norms(name) for name in stats.inputs}
    val = tokens.validation(config.eval_tokens)
    before = eval_perplexity(model, val)
    masks = compute_masks(model, config.method, config.target(), config.pattern, norms)
    apply_masks(model, masks)
    after = eval_perplexity(model, val)
    report = sparsity_report(model)
    metrics = {**{k: v for k, v in report.items() if k != "sparsity_by_kind"}, "val_perplexity": after,
               "dense_val_perplexity": before, "perplexity_delta": after / before - 1.0,
               "parameters": model.num_parameters()}
    extra = {"sparsity": {"method": config.method, "pattern": config.pattern, "target": config.target(),
                          "by_kind": report["sparsity_by_kind"], "layers": sorted(masks)},
             "teacher": parent_record(source, relative_to=config.out), "eval_data": tokens.source}
    save_model(config.out, model, loaded.tokenizer, stage="sparsify", settings=config.to_dict(), parent=source,
               metrics=metrics, extra=extra)
    log(f"wrote {config.out}: {report['sparsity']:.1%} of the block weights are 0 ({config.method}, "
        f"{config.pattern}); perplexity {before:.2f} -> {after:.2f} ({after / before - 1:+.1%})")
    return Path(config.out)
