"""Knowledge distillation: a student trained on the teacher's distributions, on run_loop.

The teacher runs frozen, in inference mode, next to the student on the same batches (no
stored logits), on the training device and under the same autocast; under torchrun every
process holds its own teacher replica. The loss (losses.py) mixes a divergence between
temperature-softened logits with cross-entropy on the data and, optionally, a hidden-state
loss through learned projections. With kd_weight 0 and hidden_weight 0 the teacher is not
run at all: the same stage then trains a student from scratch with cross-entropy, which is
how the benchmarks' baseline is made.

The student is a model folder (a pruned or sparse student, or any GPT-2 folder with the
teacher's tokenizer) or a shape: a JSON file or `key=value,...` overrides of the teacher's
GPTConfig, initialised at random. A sparse student (from `compactgpt sparsify`) keeps its
zeros: the masks are held through training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from compactgpt.artifacts import LoadedModel, load_model, parent_record, resolve_model_path, save_model
from compactgpt.calibration import check_data_tokenizer, data_source, first_tokens
from compactgpt.config import field_help, option, run_option
from compactgpt.data import DataConfig, TokenShards, prepare_data, prepared_matches
from compactgpt.device import cpu_threads
from compactgpt.errors import ConfigError
from compactgpt.evaluation import mean_loss
from compactgpt.lineage import require_same_tokenizer
from compactgpt.model import GPT, GPTConfig
from compactgpt.training import (LoopConfig, LoopResult, TrainRuntime, WindowBatches, flops_per_token, run_loop,
                                 training_stage)

from .losses import DIVERGENCES, distillation_loss
from .prune import eval_perplexity, parameter_summary
from .sparsity import MaskKeeper, masks_from_zeros, sparsity_report


def _loop_option(default, name: str):
    """A LoopConfig field with the distillation default and the loop's own help text."""
    return option(default, field_help(LoopConfig, name))


@dataclass
class DistillConfig(LoopConfig):
    """Settings of the distillation stage; one CLI flag per field; saved in the artifact."""

    teacher: str = option("", "teacher model folder (frozen; runs next to the student on the same batches)")
    student: str = option("", "student: a model folder (e.g. from compactgpt prune or sparsify), or a shape "
                          "initialised at random: a JSON file or key=value overrides of the teacher's config, e.g. "
                          "n_layer=2,n_inner=512")
    data: str | None = option(None, "training data: a prepared data folder with the teacher's tokenizer, or text "
                              "tokenized here with it; default: the teacher's training data")
    out: str = option("runs/student", "student folder to write (checkpoints go in OUT/checkpoint)")
    text_field: str = option("text", "JSONL field that holds the text")
    val_fraction: float = option(0.05, "held-out share of documents when --data is text")
    # 0 follows the models: a teacher with a short context is never an error by default.
    block_size: int = option(0, "tokens per training window (at most both models' n_positions; 0 = the shorter "
                             "of the two)")
    kd_weight: float = option(1.0, "weight of the divergence between softened teacher and student logits "
                              "(default 1)")
    ce_weight: float = option(0.0, "weight of cross-entropy on the data (default 0); --kd-weight 0 --ce-weight 1 "
                              "trains from scratch without running the teacher")
    temperature: float = option(1.0, "softmax temperature of both models in the divergence (scaled by T^2; "
                                "default 1)")
    divergence: str = option("forward_kl", "forward_kl (KL(teacher||student), mean-seeking; default) or "
                             "reverse_kl (mode-seeking)")
    hidden_weight: float = option(0.0, "weight of the hidden-state loss (normalised MSE after a learned "
                                  "projection to the teacher's width; default 0 = off)")
    eval_batches: int = option(40, "validation windows per evaluation during training")
    eval_tokens: int = option(0, "validation tokens for the final perplexities (0: the whole split)")
    # Shorter, gentler schedule than pretraining: a pruned student starts close to the teacher.
    max_steps: int = _loop_option(300, "max_steps")
    lr: float = _loop_option(1e-3, "lr")
    min_lr: float = _loop_option(1e-4, "min_lr")
    warmup_steps: int = _loop_option(20, "warmup_steps")
    eval_interval: int = _loop_option(100, "eval_interval")
    checkpoint_interval: int = _loop_option(100, "checkpoint_interval")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    overwrite: bool = run_option("overwrite", "discard an existing checkpoint in OUT and start over")
    resume: bool = run_option("resume", "continue from OUT/checkpoint (same settings)")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress", "progress bar on a terminal (--no-progress: none; logs still go to "
                                "OUT/log.jsonl)")

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("--teacher is required: the folder of the model to distill from")
        if not self.student:
            raise ConfigError("--student is required: a student folder (e.g. from compactgpt prune) or a shape "
                              "such as n_layer=2,n_embd=128,n_head=2")
        for name in ("kd_weight", "ce_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("--kd-weight and --ce-weight are both 0: the logits would get no training signal")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"--divergence {self.divergence!r} is unknown; choose one of {sorted(DIVERGENCES)}")
        if self.block_size < 0 or self.block_size == 1 or self.eval_batches <= 0 or self.eval_tokens < 0:
            raise ConfigError("--block-size must be 0 (the models' n_positions) or > 1, --eval-batches > 0, "
                              "--eval-tokens >= 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    @property
    def uses_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0

    def loss_settings(self) -> dict:
        """The settings that define the training loss."""
        return {k: getattr(self, k) for k in ("kd_weight", "ce_weight", "temperature", "divergence", "hidden_weight")}


# ---------------------------------------------------------------------------------------
# The student


def parse_student_shape(spec: str) -> dict:
    """A JSON file of GPTConfig fields, or "key=value,..." -> dict of overrides."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ConfigError(f"{spec} must hold a JSON object of GPTConfig fields")
        return d
    known = {f.name: f for f in fields(GPTConfig)}
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ConfigError(
                f"--student {spec!r} is neither an existing folder nor a shape: {part!r} is not key=value with a "
                f"GPTConfig field ({', '.join(sorted(known))})"
            )
        value = value.strip()
        try:
            out[key] = value if key == "activation_function" else (
                float(value) if key in ("dropout", "layer_norm_epsilon") else int(value))
        except ValueError:
            raise ConfigError(f"--student {spec!r}: {key}={value!r} is not a number") from None
    if not out:
        raise ConfigError(f"--student {spec!r} names no student: pass a folder or key=value settings")
    return out


def build_student(spec: str, teacher: LoadedModel, seed: int) -> tuple[GPT, Path | None, LoadedModel | None]:
    """The student model, its folder (None for a fresh shape) and its loaded artifact."""
    path = Path(spec)
    if path.is_dir():
        loaded = load_model(path)
        _check_student_tokenizer(loaded, teacher)
        return loaded.model, path, loaded
    overrides = parse_student_shape(spec)
    values = {**teacher.model.config.to_dict(), **overrides}
    if "n_embd" in overrides and "n_inner" not in overrides:
        values["n_inner"] = None  # follow GPT-2's 4 x n_embd rather than the teacher's width
    try:
        cfg = GPTConfig.from_dict(values)
    except ValueError as e:
        raise ConfigError(f"--student {spec!r}: {e}") from e
    if cfg.vocab_size < teacher.tokenizer.vocab_size:
        raise ConfigError(f"--student {spec!r}: vocab_size={cfg.vocab_size} is smaller than the teacher's tokenizer "
                          f"({teacher.tokenizer.vocab_size} tokens); the student needs a row for every token")
    torch.manual_seed(seed)  # the initial weights depend on the seed alone
    return GPT(cfg).limit_vocab(teacher.tokenizer.vocab_size), None, None


def _check_student_tokenizer(student: LoadedModel, teacher: LoadedModel) -> None:
    """ConfigError unless both use the same tokenizer: distillation compares distributions
    over token ids, which only means something when the ids mean the same strings."""
    a, b = student.tokenizer, teacher.tokenizer
    require_same_tokenizer(
        a, b,
        f"the student {student.folder} and the teacher {teacher.folder} use different tokenizers ({a.vocab_size:,} "
        f"vs {b.vocab_size:,} tokens or different merges): their token ids do not mean the same text. Build the "
        "student from this teacher (compactgpt prune, or a student config), or tokenize the data with the "
        "teacher's tokenizer (compactgpt tokenize --tokenizer TEACHER)",
    )


def training_window(block_size: int, teacher_positions: int, student_positions: int) -> int:
    """Tokens per training window: `block_size`, or for 0 the longest context both models
    take (the pipeline's planner derives its fingerprint from this too). Raises ConfigError
    for a given size longer than either model's positions."""
    longest = min(teacher_positions, student_positions)
    if block_size > longest:
        name = "teacher" if teacher_positions == longest else "student"
        raise ConfigError(f"--block-size {block_size} exceeds the {name}'s {longest} positions; pass --block-size "
                          f"{longest} or less (0 = the longest both models take)")
    return block_size or longest


def hidden_layer_map(student: GPT, teacher: GPT, plan: dict | None) -> list[tuple[int, int]]:
    """(student, teacher) indices into the hidden-state lists, one pair per student block:
    the teacher block each pruned block came from, else evenly spaced teacher blocks. The last
    pair is always the final (ln_f) states of both."""
    ls, lt = student.config.n_layer, teacher.config.n_layer
    if plan and len(plan.get("layers", [])) == ls:
        pairs = [(k + 1, plan["layers"][k] + 1) for k in range(ls)]
    else:
        pairs = [(k, max(1, round(k * lt / ls))) for k in range(1, ls + 1)]
    pairs[-1] = (ls, lt)
    return pairs


class DistillModule(nn.Module):
    """The student and the projections of its hidden states to the teacher's width: one
    module, so the optimizer, checkpoints and DDP see every trained parameter."""

    def __init__(self, student: GPT, teacher_width: int, pairs: list[tuple[int, int]], channels: list[int] | None):
        super().__init__()
        self.student = student
        self.pairs = pairs
        width = student.config.n_embd
        self.proj = None
        if pairs and width != teacher_width:
            self.proj = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in pairs)
            if channels is not None:
                # A pruned student's channels are a subset of the teacher's: start from the map
                # that puts each channel back in its place.
                scatter = torch.zeros(teacher_width, width)
                scatter[torch.tensor(channels), torch.arange(width)] = 1.0
                with torch.no_grad():
                    for p in self.proj:
                        p.weight.copy_(scatter)

    def forward(self, input_ids: torch.Tensor, with_hidden: bool = False):
        if not with_hidden:
            return self.student(input_ids).logits, None
        out = self.student(input_ids, output_hidden_states=True)
        states = [out.hidden_states[s] for s, _ in self.pairs]
        if self.proj is not None:
            states = [p(h) for p, h in zip(self.proj, states)]
        return out.logits, states


# ---------------------------------------------------------------------------------------
# Data


def resolve_data(config: DistillConfig, teacher: LoadedModel, out: Path, is_main: bool, distributed: bool, log) -> Path:
    """A data folder tokenized with the teacher's tokenizer, from --data or else the teacher's
    own training data (`compactgpt.calibration.data_source`, the rule every stage shares):
    a prepared folder (checked), or text prepared under OUT/data (reused while unchanged)."""
    source = data_source(config.data, teacher.folder, config.text_field, config.val_fraction)
    if source.prepared:
        check_data_tokenizer(source.path, teacher.tokenizer, teacher.folder)
        return Path(source.path)
    cfg = DataConfig(source=source.path, vocab_size=teacher.tokenizer.vocab_size, val_fraction=source.val_fraction,
                     text_field=source.text_field)
    folder = out / "data"
    if is_main and not prepared_matches(folder, cfg):
        log(f"tokenizing {source.path} with the teacher's tokenizer...")
        # OUT/data belongs to this run (OUT is claimed): a stale copy is replaced.
        prepare_data(cfg.replace(out=str(folder), tokenizer=str(teacher.folder), overwrite=True), log=log)
    if distributed:
        torch.distributed.barrier()
    return folder


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class Models:
    """The two models of a run and what the student's manifest says about it."""

    teacher: LoadedModel
    teacher_dir: Path
    student: GPT
    student_dir: Path | None  # None for a student initialised at random
    plan: dict | None  # the pruning plan a pruned student was sliced by
    sparse: dict | None  # the sparsity record of a sparse student: its zeros are held
    block_size: int  # tokens per training window (training_window)


def load_models(config: DistillConfig) -> Models:
    """The teacher and the student of config, and the training window that fits both."""
    teacher_dir = resolve_model_path(config.teacher)
    teacher = load_model(teacher_dir)
    student, student_dir, s_loaded = build_student(config.student, teacher, config.seed)
    block_size = training_window(config.block_size, teacher.model.config.n_positions, student.config.n_positions)
    extra = s_loaded.manifest.extra if (s_loaded and s_loaded.manifest) else {}
    return Models(teacher, teacher_dir, student, student_dir, extra.get("pruning_plan"), extra.get("sparsity"),
                  block_size)


def objective(config: DistillConfig, teacher: GPT, pairs: list[tuple[int, int]], vocab: int | None,
              val_batches: list, rt: TrainRuntime) -> tuple[Callable, Callable]:
    """run_loop's loss_fn (the distillation loss of a batch) and evaluate (validation loss of
    the student, with the loss parts averaged since the last evaluation).

    vocab: compare distributions over the first `vocab` logits only (None: all)."""
    with_hidden = bool(pairs)
    running: dict[str, list[float]] = {}

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        s_logits, s_states = model(x, with_hidden)
        t_logits, t_states = None, None
        if config.uses_teacher:
            with torch.no_grad():  # frozen teacher, eval mode: no graph, no dropout
                t_out = teacher(x, output_hidden_states=with_hidden)
            t_logits = t_out.logits
            if with_hidden:
                t_states = [t_out.hidden_states[t] for _, t in pairs]
        if vocab is not None:
            s_logits = s_logits[..., :vocab]
            t_logits = t_logits[..., :vocab] if t_logits is not None else None
        loss, parts = distillation_loss(
            s_logits, t_logits, y, kd_weight=config.kd_weight, ce_weight=config.ce_weight,
            temperature=config.temperature, divergence=config.divergence,
            hidden_pairs=list(zip(s_states, t_states)) if with_hidden else [], hidden_weight=config.hidden_weight)
        for k, v in parts.items():
            running.setdefault(k, []).append(v)
        return loss, y.numel()

    def evaluate(m: nn.Module) -> dict:
        loss = mean_loss(m.student, val_batches, rt.device, rt.autocast())
        parts = {f"train_{k}": sum(v) / len(v) for k, v in running.items() if v}
        running.clear()
        return {"val_loss": loss, "val_ppl": math.exp(loss), **parts}

    return loss_fn, evaluate


def describe_run(config: DistillConfig, models: Models, with_hidden: bool, device) -> str:
    """One line on the student's size and the loss it is trained with."""
    student = models.student
    summary = parameter_summary(student, models.teacher.model)
    return (f"student: {summary['parameters']:,} parameters ({summary['non_embedding_ratio']:.1%} of the teacher's "
            f"non-embedding), {student.config.n_layer} layers x {student.config.n_embd} wide; "
            f"loss {config.kd_weight} x {config.divergence} (T={config.temperature}) + {config.ce_weight} x CE"
            + (f" + {config.hidden_weight} x hidden" if with_hidden else "")
            + (" (teacher not run)" if not config.uses_teacher else "") + f"; device {device}")


def save_student(config: DistillConfig, out: Path, models: Models, result: LoopResult, val: TokenShards,
                 pairs: list[tuple[int, int]], data_dir: Path, device, log: Callable[[str], None]) -> None:
    """Score the trained student and the teacher on the validation split and write the student
    with a manifest naming the teacher, the pruning plan, the losses and the tokens spent."""
    student, teacher, plan = models.student, models.teacher.model, models.plan
    student.eval()
    vtokens = first_tokens(val, config.eval_tokens)
    s_ppl = eval_perplexity(student, vtokens, device)
    t_ppl = eval_perplexity(teacher, vtokens, device)
    t_manifest = models.teacher.manifest
    t_tokens = t_manifest.metrics.get("train_tokens") if t_manifest else None
    tokens = result.state.tokens
    metrics = {**result.metrics, **parameter_summary(student, teacher), "val_perplexity": s_ppl,
               "teacher_val_perplexity": t_ppl, "perplexity_delta": s_ppl / t_ppl - 1.0,
               "val_tokens_scored": int(vtokens.numel()) - 1, "teacher_train_tokens": t_tokens,
               "token_fraction_of_teacher": tokens / t_tokens if t_tokens else None}
    if models.sparse:
        metrics.update({k: v for k, v in sparsity_report(student).items() if k != "sparsity_by_kind"})
    student_dir = models.student_dir
    extra = {
        "teacher": parent_record(models.teacher_dir, relative_to=out),
        "student_init": os.path.relpath(student_dir.resolve(), Path(out).resolve()) if student_dir else f"random ({config.student}, seed {config.seed})",
        "pruning_plan": ({k: plan[k] for k in ("layers", "shape")} if plan else None),
        "sparsity": models.sparse,
        "losses": {**config.loss_settings(), "hidden_pairs": pairs, "teacher_run": config.uses_teacher},
        "tokens": tokens,
        "data": str(Path(data_dir).resolve()),
    }
    save_model(out, student.cpu(), models.teacher.tokenizer, stage="distill", settings=config.to_dict(),
               parent=student_dir or models.teacher_dir, metrics=metrics, extra=extra)
    log(f"wrote {out}: perplexity {s_ppl:.2f} vs teacher {t_ppl:.2f} ({s_ppl / t_ppl - 1:+.1%}) after "
        f"{tokens:,} tokens" + (f" ({metrics['token_fraction_of_teacher']:.1%} of the teacher's)" if t_tokens else ""))


def distill(config: DistillConfig, log: Callable[[str], None] = print) -> Path:
    """Train config.student on config.teacher's outputs and write the student to config.out.

    Returns the folder. Raises ConfigError on a tokenizer mismatch between teacher, student
    and data, on a block size longer than either model's context, on an --out that is the
    teacher or the student, and when OUT holds a checkpoint and neither config.resume nor
    config.overwrite is set.
    """
    out = Path(config.out)
    student_folder = config.student if Path(config.student).is_dir() else None
    inputs = {"--teacher": config.teacher, "--student": student_folder, "--data": config.data}
    with cpu_threads(config.threads), training_stage(config, out, resume=config.resume, overwrite=config.overwrite,
                                                     inputs=inputs, stage="distill") as rt:
        models = load_models(config)
        config = config.replace(block_size=models.block_size)  # 0 resolved: saved and fingerprinted as run
        if models.sparse and rt.fsdp:
            # The masks hold the zeros of the plain student, but FSDP trains a sharded copy.
            raise ConfigError("a sparse student cannot be distilled with --parallel fsdp (its zeros would not "
                              "be held); use --parallel ddp")
        teacher, student, plan = models.teacher.model, models.student, models.plan
        out.mkdir(parents=True, exist_ok=True)
        data_dir = resolve_data(config, models.teacher, out, rt.is_main, rt.distributed, log)
        train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
        train.check_window(config.block_size)

        pairs = hidden_layer_map(student, teacher, plan) if config.hidden_weight > 0 else []
        module = DistillModule(student, teacher.config.n_embd, pairs, plan.get("channels") if plan else None)
        teacher.to(rt.device).eval().requires_grad_(False)
        keeper = MaskKeeper(module, masks_from_zeros(student), prefix="student.") if models.sparse else None
        # Padding rows beyond the tokenizer carry no tokens: compare distributions over real tokens
        # only. Needed whenever there is padding, not only when the two are padded differently:
        # the frozen teacher runs in eval mode, where its padding logits are masked to the lowest
        # float, which reverse KL (p_s log p_t) or a temperature below 1 (min / T = -inf) would
        # turn into enormous or NaN losses.
        n_tokens = models.teacher.tokenizer.vocab_size
        padded = max(student.config.vocab_size, teacher.config.vocab_size) > n_tokens
        vocab = n_tokens if padded else None
        loss_fn, evaluate = objective(config, teacher, pairs, vocab,
                                      val.validation_batches(config.eval_batches, config.block_size), rt)
        fingerprint = {"student": student.config.to_dict(), "teacher": parent_record(models.teacher_dir)["sha256"],
                       "data": str(Path(data_dir).resolve()), "block_size": config.block_size,
                       "loss": config.loss_settings()}
        if rt.is_main:
            log(describe_run(config, models, bool(pairs), rt.device))
        flops = flops_per_token(student.config, config.block_size)
        if config.uses_teacher:
            flops += flops_per_token(teacher.config, config.block_size) / 3  # forward only
        try:
            result = run_loop(module, config, out, WindowBatches(train, config.batch_size, config.block_size), loss_fn,
                              evaluate, runtime=rt, fingerprint=fingerprint, resume=config.resume,
                              flops_per_token=flops, log=log, progress=config.progress, on_step=keeper,
                              desc="distill")
        finally:
            if keeper is not None:
                keeper.remove()
        if rt.is_main:
            save_student(config, out, models, result, val, pairs, data_dir, rt.device, log)
    return out
