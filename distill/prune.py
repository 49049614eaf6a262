"""Structured pruning: a smaller GPT-2 sliced out of a larger one.

Prepare -> calibrate -> convert: importance scores come from activations over calibration
batches (see importance.py); a `PrunePlan` names what each dimension keeps; `apply_plan`
slices the weights into a plain GPT-2-shaped student (same count per layer, head width
unchanged), which every later stage, transformers and Optimum load as any GPT-2.

GPT-2 ties the attention width to the residual width: n_embd == n_head * head_dim. Head
width is kept, so heads and embedding channels are pruned together: with 64-wide heads,
4 heads x 64 -> 3 heads x 64 means n_embd 256 -> 192. Give either --heads or --embd (the
other follows), or both when they agree. The heads kept and the channels kept are chosen
independently (by their own scores); only their counts are tied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compactgpt.artifacts import load_model, parent_record, resolve_model_path, save_model
from compactgpt.calibration import CalibrationConfig, calibration_windows, data_tokens
from compactgpt.config import option, run_option
from compactgpt.device import cpu_threads, device_of, resolve_device
from compactgpt.errors import ConfigError
from compactgpt.evaluation import model_logits_fn, perplexity
from compactgpt.model import GPT, GPTConfig
from compactgpt.outputs import claim_output

from .importance import DEPTH_METRICS, ActivationStats, collect_stats, top_k_indices

# Calibration windows per forward pass: the activations of one batch stay small.
CALIBRATION_BATCH = 8

SHAPE_RULE = (
    "GPT-2 ties attention width to residual width (n_embd = n_head x head_dim) and pruning keeps "
    "the head width, so --heads and --embd go together: with {hd}-wide heads, {h} heads x {hd} = "
    "n_embd {c}; e.g. --heads {h2} means --embd {c2}"
)


@dataclass
class PruneConfig(CalibrationConfig):
    """Settings of the structured pruning stage; one CLI flag per field; saved in the artifact."""

    model: str = option("", "model folder to prune (the teacher)")
    out: str = option("", "folder to write the pruned student to")
    layers: int | None = option(None, "transformer blocks to keep (the least important by --depth-metric are "
                                "removed)")
    heads: int | None = option(None, "attention heads to keep per block (sets --embd to heads x head width)")
    embd: int | None = option(None, "embedding channels to keep (a multiple of the head width; sets --heads)")
    mlp: int | None = option(None, "MLP neurons to keep per block")
    depth_metric: str = option("loss", "block ranking: loss (loss increase when the block is skipped) or cosine "
                               "(1 - cos between the block's input and output)")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    overwrite: bool = run_option("overwrite")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required: the folder of the model to prune")
        super().validate()
        if not self.out:
            raise ConfigError("--out is required: the folder to write the pruned student to")
        for name in ("layers", "heads", "embd", "mlp"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name} must be a positive count, got {v}")
        if self.depth_metric not in DEPTH_METRICS:
            raise ConfigError(f"--depth-metric {self.depth_metric!r} is unknown; choose one of {sorted(DEPTH_METRICS)}")


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    n_inner: int


def target_shape(teacher: GPTConfig, layers: int | None = None, heads: int | None = None,
                 embd: int | None = None, mlp: int | None = None) -> Shape:
    """The student's shape from the counts given (others kept); ConfigError when a count is
    larger than the teacher's or heads and embedding width disagree."""
    hd = teacher.head_dim

    def rule() -> str:
        h2 = max(1, teacher.n_head - 1)
        return SHAPE_RULE.format(hd=hd, h=teacher.n_head, c=teacher.n_embd, h2=h2, c2=h2 * hd)

    for name, got, have in (("layers", layers, teacher.n_layer), ("heads", heads, teacher.n_head),
                            ("embd", embd, teacher.n_embd), ("mlp", mlp, teacher.n_inner)):
        if got is not None and got > have:
            raise ConfigError(
                f"--{name} {got} is larger than the teacher's {have}: pruning only removes units; "
                f"pass --{name} {have} or less"
            )
    if embd is not None and embd % hd:
        raise ConfigError(
            f"--embd {embd} is not a multiple of the head width {hd}, so it cannot be a whole number of "
            f"heads. " + rule()
        )
    if heads is not None and embd is not None and heads * hd != embd:
        raise ConfigError(f"--heads {heads} and --embd {embd} disagree ({heads} x {hd} = {heads * hd}). " + rule())
    if heads is None and embd is not None:
        heads = embd // hd
    if embd is None and heads is not None:
        embd = heads * hd
    return Shape(layers or teacher.n_layer, heads or teacher.n_head, embd or teacher.n_embd, mlp or teacher.n_inner)


@dataclass
class PrunePlan:
    """What the student keeps of the teacher, as teacher indices (each list ascending).

    layers: teacher blocks kept, in order; heads / neurons: per kept teacher block;
    channels: embedding channels, shared by every layer (the residual stream)."""

    layers: list[int]
    heads: dict[int, list[int]]
    channels: list[int]
    neurons: dict[int, list[int]]
    scores: dict = field(default_factory=dict)  # summaries for the manifest, not used to slice

    def shape(self) -> Shape:
        first = self.layers[0]
        return Shape(len(self.layers), len(self.heads[first]), len(self.channels), len(self.neurons[first]))

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": {str(k): v for k, v in self.heads.items()},
                "channels": self.channels, "neurons": {str(k): v for k, v in self.neurons.items()},
                "shape": asdict(self.shape()), "scores": self.scores}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(list(d["layers"]), {int(k): list(v) for k, v in d["heads"].items()}, list(d["channels"]),
                   {int(k): list(v) for k, v in d["neurons"].items()}, d.get("scores", {}))

    @classmethod
    def keep_all(cls, config: GPTConfig) -> "PrunePlan":
        layers = list(range(config.n_layer))
        return cls(layers, {i: list(range(config.n_head)) for i in layers}, list(range(config.n_embd)),
                   {i: list(range(config.n_inner)) for i in layers})


def make_plan(stats: ActivationStats, depth_scores: torch.Tensor | None, shape: Shape) -> PrunePlan:
    """Keep the highest-scoring units of each kind; pure given the scores."""
    n_layer = len(stats.heads)
    if shape.n_layer < n_layer:
        layers = top_k_indices(depth_scores, shape.n_layer)
    else:
        layers = list(range(n_layer))
    heads = {i: top_k_indices(stats.head_scores(i), shape.n_head) for i in layers}
    neurons = {i: top_k_indices(stats.neuron_scores(i), shape.n_inner) for i in layers}
    channels = top_k_indices(stats.channel_scores(), shape.n_embd)
    scores = {"depth": [round(float(s), 6) for s in depth_scores] if depth_scores is not None else None,
              "heads": {str(i): [round(float(s), 6) for s in stats.head_scores(i)] for i in range(n_layer)}}
    return PrunePlan(layers, heads, channels, neurons, scores)


def _qkv_rows(heads: list[int], head_dim: int, width: int) -> torch.Tensor:
    """Rows of c_attn (q, k and v stacked, each `width` rows) that belong to the kept heads."""
    per_head = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]
    within = torch.cat(per_head)
    return torch.cat([within + part * width for part in range(3)])


def _head_cols(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@torch.no_grad()
def apply_plan(model: GPT, plan: PrunePlan) -> GPT:
    """A new GPT holding the slices of `model` the plan keeps, on the model's device. Pure:
    `model` is not changed.

    Index lists need not be sorted; any order (a permutation, in tests) is applied as given."""
    cfg = model.config
    if not plan.layers or any(not 0 <= i < cfg.n_layer for i in plan.layers):
        raise ConfigError(f"plan layers {plan.layers} are not blocks of a {cfg.n_layer}-block model")
    counts = {len(plan.heads[i]) for i in plan.layers}, {len(plan.neurons[i]) for i in plan.layers}
    if len(counts[0]) != 1 or len(counts[1]) != 1:
        raise ConfigError("a plan must keep the same number of heads and of neurons in every block (GPT-2 has one shape per layer)")
    shape = plan.shape()
    if shape.n_embd != shape.n_head * cfg.head_dim:
        raise ConfigError(
            f"the plan keeps {shape.n_head} heads but {shape.n_embd} channels; "
            + SHAPE_RULE.format(hd=cfg.head_dim, h=cfg.n_head, c=cfg.n_embd, h2=shape.n_head,
                                c2=shape.n_head * cfg.head_dim)
        )
    new_cfg = GPTConfig(**{**cfg.to_dict(), "n_layer": shape.n_layer, "n_head": shape.n_head,
                           "n_embd": shape.n_embd, "n_inner": shape.n_inner})
    src = model.state_dict()
    ch = torch.tensor(plan.channels)
    hd, C = cfg.head_dim, cfg.n_embd
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": src["transformer.wte.weight"][:, ch],
        "transformer.wpe.weight": src["transformer.wpe.weight"][:, ch],
        "transformer.ln_f.weight": src["transformer.ln_f.weight"][ch],
        "transformer.ln_f.bias": src["transformer.ln_f.bias"][ch],
    }
    out["lm_head.weight"] = out["transformer.wte.weight"]
    for j, i in enumerate(plan.layers):
        s, d = f"transformer.h.{i}.", f"transformer.h.{j}."
        qkv = _qkv_rows(plan.heads[i], hd, C)
        hcols = _head_cols(plan.heads[i], hd)
        nrn = torch.tensor(plan.neurons[i])
        for ln in ("ln_1", "ln_2"):
            out[d + ln + ".weight"] = src[s + ln + ".weight"][ch]
            out[d + ln + ".bias"] = src[s + ln + ".bias"][ch]
        out[d + "attn.c_attn.weight"] = src[s + "attn.c_attn.weight"][qkv][:, ch]
        out[d + "attn.c_attn.bias"] = src[s + "attn.c_attn.bias"][qkv]
        out[d + "attn.c_proj.weight"] = src[s + "attn.c_proj.weight"][ch][:, hcols]
        out[d + "attn.c_proj.bias"] = src[s + "attn.c_proj.bias"][ch]
        out[d + "mlp.c_fc.weight"] = src[s + "mlp.c_fc.weight"][nrn][:, ch]
        out[d + "mlp.c_fc.bias"] = src[s + "mlp.c_fc.bias"][nrn]
        out[d + "mlp.c_proj.weight"] = src[s + "mlp.c_proj.weight"][ch][:, nrn]
        out[d + "mlp.c_proj.bias"] = src[s + "mlp.c_proj.bias"][ch]
    student = GPT(new_cfg).limit_vocab(model.vocab_limit)  # pruning keeps every vocabulary row
    student.load_state_dict({k: v.clone() for k, v in out.items()}, strict=True)
    student.lm_head.weight = student.transformer.wte.weight  # load_state_dict keeps the tie; be explicit
    return student.to(device_of(model)).train(model.training)


def parameter_summary(student: GPT, teacher: GPT) -> dict:
    """Parameter counts of both and the student's share of the teacher's."""
    s, t = student.num_parameters(), teacher.num_parameters()
    sn, tn = student.num_parameters(True), teacher.num_parameters(True)
    return {"parameters": s, "non_embedding_parameters": sn, "teacher_parameters": t,
            "teacher_non_embedding_parameters": tn, "parameter_ratio": s / t, "non_embedding_ratio": sn / tn}


def eval_perplexity(model: GPT, tokens: torch.Tensor, device: str | torch.device | None = None) -> float:
    """Sliding-window perplexity with windows of n_positions and stride n_positions / 2: the
    settings pretraining reports, so figures compare across stages. `tokens` may be on the
    CPU; the model runs on `device` (default: where its parameters are)."""
    n = model.config.n_positions
    device = device if device is not None else device_of(model)
    return perplexity(model_logits_fn(model, device), tokens, max_length=n, stride=n // 2).perplexity


def prune(config: PruneConfig, log: Callable[[str], None] = print) -> Path:
    """Prune config.model to the shape asked for and write the student to config.out.

    Returns the folder. The manifest records the plan (every kept index), the importance
    scores of blocks and heads, parameter counts and perplexity before and after. Raises
    ConfigError, before any work, for an --out that claim_output refuses (the model folder or a
    folder above it, another artifact without config.overwrite, a run already writing it).
    """
    config.validate()
    with cpu_threads(config.threads), claim_output(config.out, stage="prune", overwrite=config.overwrite,
                                                   inputs={"--model": config.model, "--data": config.data}):
        return _prune(config, log)


def _prune(config: PruneConfig, log: Callable[[str], None]) -> Path:
    device = resolve_device(config.device)
    teacher_dir = resolve_model_path(config.model)
    loaded = load_model(teacher_dir, device=device)  # calibration batches are moved to it where used
    teacher = loaded.model
    shape = target_shape(teacher.config, config.layers, config.heads, config.embd, config.mlp)
    tokens = data_tokens(config.data, loaded, config.text_field, config.val_fraction)
    batches = list(calibration_windows(tokens.train, config.calib_samples, config.calib_seq_len,
                                       teacher.config.n_positions, config.seed).split(CALIBRATION_BATCH))
    log(f"calibrating on {sum(b.numel() for b in batches):,} tokens of {tokens.source}")
    stats = collect_stats(teacher, batches, progress=config.progress)
    depth = None
    if shape.n_layer < teacher.config.n_layer:
        depth = DEPTH_METRICS[config.depth_metric](teacher, batches, stats, config.progress)
    plan = make_plan(stats, depth, shape)
    student = apply_plan(teacher, plan).eval()

    val = tokens.validation(config.eval_tokens)
    log(f"evaluating teacher and student on {val.numel():,} validation tokens")
    t_ppl = eval_perplexity(teacher, val)
    s_ppl = eval_perplexity(student, val)
    metrics = {**parameter_summary(student, teacher), "val_perplexity": s_ppl, "teacher_val_perplexity": t_ppl,
               "perplexity_delta": s_ppl / t_ppl - 1.0, "val_tokens_scored": int(val.numel()) - 1,
               "calibration_tokens": sum(b.numel() for b in batches)}
    extra = {"teacher": parent_record(teacher_dir, relative_to=config.out), "pruning_plan": plan.to_dict(), "eval_data": tokens.source}
    save_model(config.out, student, loaded.tokenizer, stage="prune", settings=config.to_dict(), parent=teacher_dir,
               metrics=metrics, extra=extra)
    log(f"wrote {config.out}: {shape.n_layer} layers x {shape.n_head} heads x {shape.n_embd} wide, MLP "
        f"{shape.n_inner}; {metrics['non_embedding_ratio']:.1%} of the teacher's non-embedding parameters; "
        f"perplexity {t_ppl:.2f} -> {s_ppl:.2f} ({metrics['perplexity_delta']:+.1%}) right after pruning")
    if not math.isfinite(s_ppl):
        log("warning: the pruned student's perplexity is not finite; distill it before use")
    return Path(config.out)
