"""Every export is checked against PyTorch before its folder is marked complete.

First the signature, by name: the ONNX Runtime session's inputs and outputs must be exactly
those `export.spec` names, and every axis the spec makes dynamic (batch, sequence, past) must
be dynamic in the graph. Only then the values, output by output, each read from the session
by its name (never by position, so a graph that lists its outputs in another order is still
compared tensor with tensor).

The value cases use shapes other than any a tracer would have seen: batch 1 and 3, prompts of
1 and 17 tokens, with and without a past, with left padding. Logits are compared at real
(unpadded) positions and real tokens, where their values mean something: the columns of an
embedding's padding rows (past the tokenizer's vocabulary) must instead hold exactly the
dtype's lowest value, the mask that keeps any runtime from picking them (their huge values
would otherwise also swamp the relative bound). Present KV is compared everywhere
in the first layer and at real positions in the others (a padded position's hidden state
is never read, so its value is the runtime's own business). The past fed to ONNX Runtime is
PyTorch's, so a case isolates one call of the graph.

`session` below is anything with ONNX Runtime's InferenceSession interface: get_inputs(),
get_outputs() (objects with .name and .shape) and run(None, feeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compactgpt.model import GPT

from .errors import AxisError, InputNameError, OutputNameError, OutputShapeError, ParityError
from .spec import DecoderSpec

# Names listed in an error message before it says "..."; a 24-layer model has 48 past names.
SHOWN_NAMES = 4


@dataclass(frozen=True)
class Case:
    """One call of the graph: batch rows, tokens fed, tokens already cached, padding."""

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
    """Whether the case's past + new tokens fit the model's positions."""
    return case.past + case.new <= n_positions


# ---------------------------------------------------------------------------------------
# Names and axes


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(repr(n) for n in names[:SHOWN_NAMES]) + more


def check_names(kind: str, got: list[str], want: list[str], error: type[Exception]) -> None:
    """Raise `error` naming the tensors of one kind ("input" / "output") the graph lacks or
    has beyond the spec's."""
    missing = [n for n in want if n not in got]
    unexpected = [n for n in got if n not in want]
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"lacks the {kind}(s) {_shown(missing)}")
    if unexpected:
        problems.append(f"has {kind}(s) export.spec does not name: {_shown(unexpected)}")
    raise error(
        f"the exported graph {' and '.join(problems)}; the graph builder and export.spec disagree, "
        "so ONNX Runtime, Optimum and onnxruntime-genai could not feed it"
    )


def check_axes(args: list, shapes: dict[str, list]) -> None:
    """Raise AxisError for the first tensor whose rank differs from the spec's, whose axis the
    spec makes dynamic (a name) is fixed in the graph, or whose fixed size differs.

    args: ONNX Runtime NodeArgs (a dynamic axis's shape entry is a name or None)."""
    for arg in args:
        want, got = shapes[arg.name], list(arg.shape)
        if len(got) != len(want):
            raise AxisError(f"{arg.name} has rank {len(got)} {got} in the graph; export.spec says {want}")
        for axis, (g, w) in enumerate(zip(got, want)):
            if isinstance(w, str) and isinstance(g, int):
                raise AxisError(
                    f"axis {axis} ({w}) of {arg.name} is fixed to {g} in the graph; export.spec makes it "
                    "dynamic, so any other size would be refused at run time"
                )
            if isinstance(w, int) and isinstance(g, int) and g != w:
                raise AxisError(f"axis {axis} of {arg.name} is {g} in the graph; export.spec says {w}")


def check_signature(session, spec: DecoderSpec) -> None:
    """Input names, output names, then the axes of each, against the spec. Raises
    InputNameError, OutputNameError or AxisError."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    check_names("input", [a.name for a in inputs], spec.input_names, InputNameError)
    check_names("output", [a.name for a in outputs], spec.output_names, OutputNameError)
    check_axes(inputs, spec.input_shapes())
    check_axes(outputs, spec.output_shapes())


# ---------------------------------------------------------------------------------------
# Values


@torch.no_grad()
def case_reference(model: GPT, spec: DecoderSpec, case: Case, np_dtype=np.float32):
    """(feeds, expected, masks) of one case: the graph's inputs by name, PyTorch's output of
    each output name, and the real-position masks (new tokens (B, T), all tokens (B, P + T))."""
    x = case_inputs(case, model.config.vocab_size)
    ids, mask, pos = x["input_ids"], x["attention_mask"], x["position_ids"]
    P = case.past
    past = None
    if P:
        past = model(ids[:, :P], mask[:, :P], pos[:, :P], use_cache=True).past_key_values
    out = model(ids[:, P:], mask, pos[:, P:], past_key_values=past, use_cache=True)
    ref_logits, ref_present = out.logits, out.past_key_values
    empty = np.zeros((case.batch, spec.n_head, 0, spec.head_dim), np.float32)
    feeds = {spec.input_ids: ids[:, P:].numpy(), spec.attention_mask: mask.numpy(),
             spec.position_ids: pos[:, P:].numpy()}
    expected = {spec.logits: ref_logits.numpy()}
    for i in range(spec.n_layer):
        names = ((spec.past_key(i), spec.present_key(i)), (spec.past_value(i), spec.present_value(i)))
        for j, (past_name, present_name) in enumerate(names):
            feeds[past_name] = (past[i][j].numpy() if past else empty).astype(np_dtype)
            expected[present_name] = ref_present[i][j].numpy()
    return feeds, expected, (mask[:, P:].bool().numpy(), mask.bool().numpy())


def session_outputs(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run of the session, its outputs keyed by the names the session gives them."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def check_vocab_mask(logits: np.ndarray, n_tokens: int, case: Case, np_dtype=np.float32) -> None:
    """Raise ParityError unless every logit (B, T, V) of a column >= n_tokens (padding rows
    of the embedding) is the graph dtype's lowest value, the mask PyTorch applies too."""
    padding = logits[..., n_tokens:]
    lowest = float(np.finfo(np_dtype).min)
    if padding.size and not np.all(padding == lowest):
        raise ParityError(
            f"ONNX Runtime's logits of the {logits.shape[-1] - n_tokens} padding rows past the tokenizer's "
            f"{n_tokens} tokens are not masked at {case.name} (max {float(padding.max()):.3g}, expected "
            f"{lowest:.3g}): a runtime could generate ids no token has. Re-export with this CompactGPT"
        )


def output_differences(model: GPT, session, spec: DecoderSpec, case: Case, np_dtype=np.float32,
                       n_tokens: int | None = None) -> dict:
    """Max |ONNX - PyTorch| of each output for one case, outputs read by name.

    n_tokens: the tokenizer's size; logits are compared on the first n_tokens columns and the
    others must be masked (`check_vocab_mask`). None: every column is a token.
    Returns {"outputs": {name: max diff}, "logits": the logits' (real positions and tokens),
    "present": the largest over present KV, "logits_scale": max |PyTorch logits| there}.
    Raises OutputShapeError when an output's shape is not PyTorch's, ParityError when the
    padding columns are not masked.
    """
    feeds, expected, (real_new, real_all) = case_reference(model, spec, case, np_dtype)
    outs = session_outputs(session, feeds)
    n_tokens = spec.vocab_size if n_tokens is None else n_tokens
    diffs: dict[str, float] = {}
    for name, want in expected.items():
        got = np.asarray(outs[name], dtype=np.float32)
        if got.shape != want.shape:
            raise OutputShapeError(
                f"ONNX Runtime's {name} has shape {list(got.shape)} at {case.name}; PyTorch's has "
                f"{list(want.shape)}"
            )
        if name == spec.logits:
            check_vocab_mask(got[real_new], n_tokens, case, np_dtype)
            got, want = got[..., :n_tokens], want[..., :n_tokens]
        diff = np.abs(got - want)
        if name == spec.logits:
            diff = diff[real_new]
        elif name not in (spec.present_key(0), spec.present_value(0)):
            diff = diff.transpose(0, 2, 1, 3)[real_all]  # (B, nh, P+T, hs) -> real positions
        diffs[name] = float(diff.max())
    present = max([0.0] + [diffs[n] for n in spec.present_names])
    scale = float(np.abs(expected[spec.logits][..., :n_tokens])[real_new].max())
    return {"outputs": diffs, "logits": diffs[spec.logits], "present": present, "logits_scale": scale}


def validate(model: GPT, session, spec: DecoderSpec, *, atol: float | None = None, rtol: float | None = None,
             np_dtype=np.float32, n_tokens: int | None = None, left_padding: bool = True) -> dict:
    """Check the session's signature against the spec, then run every case; raise the
    signature's error, or ParityError naming the first failing case and its worst output.

    atol bounds the absolute differences (float exports); rtol bounds max|diff| / max|logits|
    (quantized exports, whose kernels round activations differently). n_tokens: the
    tokenizer's size (default: the model's `vocab_limit`); the logits of padding rows past it
    must be masked. left_padding: also check batches with a left-padded row (off for a graph
    that does not support them: a shared KV cache). Returns the report that goes into the
    manifest: per-case differences and the maxima.
    """
    check_signature(session, spec)
    if n_tokens is None:
        n_tokens = getattr(model, "vocab_limit", None)
    report: dict = {"cases": {}}
    worst_logits = worst_present = worst_rel = 0.0
    for case in CASES:
        if not fits(case, model.config.n_positions) or (case.left_pad and not left_padding):
            continue
        d = output_differences(model, session, spec, case, np_dtype, n_tokens)
        rel = d["logits"] / max(d["logits_scale"], 1e-12)
        report["cases"][case.name] = {"logits": d["logits"], "present": d["present"], "logits_rel": rel}
        worst_logits, worst_present = max(worst_logits, d["logits"]), max(worst_present, d["present"])
        worst_rel = max(worst_rel, rel)
        if atol is not None and (d["logits"] > atol or d["present"] > atol):
            worst = max(d["outputs"], key=d["outputs"].get)
            raise ParityError(
                f"ONNX Runtime differs from PyTorch at {case.name}: max |logits diff| {d['logits']:.3g}, "
                f"max |present KV diff| {d['present']:.3g}, tolerance {atol:g}, worst output {worst}. The "
                "export is wrong; report it with the model's config, or export with --no-optimize to test "
                "the unfused graph"
            )
        if rtol is not None and rel > rtol:
            raise ParityError(
                f"ONNX Runtime's quantized logits differ from the PyTorch quantized model at {case.name}: "
                f"max |diff| / max |logits| = {rel:.3g} > {rtol:g}. Try --accuracy-level 0 (float "
                "activations), or raise --quant-rtol if the difference is expected"
            )
    report.update(max_logits_diff=worst_logits, max_present_diff=worst_present, max_logits_rel_diff=worst_rel)
    return report
