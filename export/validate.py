"""Every export is checked against PyTorch before its folder is marked complete.

The cases use shapes other than any a tracer would have seen: batch 1 and 3, prompts of 1
and 17 tokens, with and without a past, with left padding. Logits are compared at real
(unpadded) positions, where their values mean something; present KV is compared everywhere
in the first layer and at real positions in the others (a padded position's hidden state
is never read, so its value is the runtime's own business). The past fed to ONNX Runtime is
PyTorch's, so a case isolates one call of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compactgpt.model import GPT

from .config import ParityError
from .spec import DecoderSpec


@dataclass(frozen=True)
class Case:
    batch: int
    new: int  # tokens fed in this call
    past: int  # tokens already in the KV cache
    left_pad: bool  # row 0 is left-padded by a few tokens

    @property
    def name(self) -> str:
        pad = ", left-padded" if self.left_pad else ""
        return f"batch {self.batch}, {self.new} new + {self.past} past{pad}"


CASES = (
    Case(1, 1, 0, False),
    Case(1, 17, 0, False),
    Case(3, 17, 0, True),
    Case(1, 1, 17, False),
    Case(3, 1, 17, True),
    Case(3, 5, 11, True),
)


def case_inputs(case: Case, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / position_ids for the whole (past + new) sequence."""
    g = torch.Generator().manual_seed(seed)
    total = case.past + case.new
    ids = torch.randint(0, vocab, (case.batch, total), generator=g)
    mask = torch.ones(case.batch, total, dtype=torch.long)
    if case.left_pad:
        mask[0, : max(1, min(4, total - case.new))] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def fits(case: Case, n_positions: int) -> bool:
    return case.past + case.new <= n_positions


@torch.no_grad()
def compare(model: GPT, run, spec: DecoderSpec, case: Case, np_dtype=np.float32) -> dict[str, float]:
    """Max |ONNX - PyTorch| of logits (real positions) and present KV for one case.

    run(feeds: dict[str, np.ndarray]) -> list of outputs in spec.output_names order.
    Returns {"logits": ..., "present": ..., "logits_scale": max |PyTorch logits|}.
    """
    x = case_inputs(case, model.config.vocab_size)
    ids, mask, pos = x["input_ids"], x["attention_mask"], x["position_ids"]
    P = case.past
    past = None
    if P:
        _, past = model(ids[:, :P], mask[:, :P], pos[:, :P], use_cache=True)
    ref_logits, ref_present = model(ids[:, P:], mask, pos[:, P:], past_key_values=past, use_cache=True)
    B, nh, hs = case.batch, spec.n_head, spec.head_dim
    feeds = {spec.input_ids: ids[:, P:].numpy(), spec.attention_mask: mask.numpy(),
             spec.position_ids: pos[:, P:].numpy()}
    for i in range(spec.n_layer):
        k = past[i][0].numpy() if past else np.zeros((B, nh, 0, hs), np.float32)
        v = past[i][1].numpy() if past else np.zeros((B, nh, 0, hs), np.float32)
        feeds[spec.past_key(i)], feeds[spec.past_value(i)] = k.astype(np_dtype), v.astype(np_dtype)
    outs = run(feeds)
    logits = np.asarray(outs[0], dtype=np.float32)
    real_new = mask[:, P:].bool().numpy()
    real_all = mask.bool().numpy()
    d_logits = float(np.abs(logits - ref_logits.numpy())[real_new].max())
    d_present = 0.0
    for i in range(spec.n_layer):
        for j in range(2):
            got = np.asarray(outs[1 + 2 * i + j], dtype=np.float32)
            want = ref_present[i][j].numpy()
            diff = np.abs(got - want)  # (B, nh, P+T, hs)
            if i > 0:
                diff = diff.transpose(0, 2, 1, 3)[real_all]
            d_present = max(d_present, float(diff.max()))
    scale = float(np.abs(ref_logits.numpy())[real_new].max())
    return {"logits": d_logits, "present": d_present, "logits_scale": scale}


def validate(model: GPT, run, spec: DecoderSpec, *, atol: float | None = None, rtol: float | None = None,
             np_dtype=np.float32) -> dict:
    """Run every case; raise ParityError naming the first failing case.

    atol bounds the absolute differences (float exports); rtol bounds max|diff| / max|logits|
    (quantized exports, whose kernels round activations differently). Returns the report
    that goes into the manifest: per-case differences and the maxima.
    """
    report: dict = {"cases": {}}
    worst_logits = worst_present = worst_rel = 0.0
    for case in CASES:
        if not fits(case, model.config.n_positions):
            continue
        d = compare(model, run, spec, case, np_dtype)
        rel = d["logits"] / max(d["logits_scale"], 1e-12)
        report["cases"][case.name] = {"logits": d["logits"], "present": d["present"], "logits_rel": rel}
        worst_logits, worst_present = max(worst_logits, d["logits"]), max(worst_present, d["present"])
        worst_rel = max(worst_rel, rel)
        if atol is not None and (d["logits"] > atol or d["present"] > atol):
            raise ParityError(
                f"ONNX Runtime differs from PyTorch at {case.name}: max |logits diff| {d['logits']:.3g}, "
                f"max |present KV diff| {d['present']:.3g}, tolerance {atol:g}. The export is wrong; "
                "report it with the model's config, or export with --no-optimize to test the unfused graph"
            )
        if rtol is not None and rel > rtol:
            raise ParityError(
                f"ONNX Runtime's quantized logits differ from the PyTorch quantized model at {case.name}: "
                f"max |diff| / max |logits| = {rel:.3g} > {rtol:g}. Try --accuracy-level 0 (float "
                "activations), or raise --quant-rtol if the difference is expected"
            )
    report.update(max_logits_diff=worst_logits, max_present_diff=worst_present, max_logits_rel_diff=worst_rel)
    return report
