"""Finetuning the teacher: domain adaptation (lm), instruction tuning (instruct) and
classification (classify), each with optional LoRA.

    finetune(FinetuneConfig(model="runs/teacher", task="instruct", data="data.json", out="runs/chat"))

A task (see TASKS) turns the parent model and the data into what the shared training loop
needs (the model to train, batches, a loss, a quick validation) plus a held-out report that
is computed before and after training, and the writer of its artifact. Every task runs
through `training.run_loop`, so finetuning gets the same schedule, clipping, bf16 on CUDA,
checkpoints and exact resume as pretraining. With --lora-rank R the parent's weights are
frozen, adapters train, and they are merged into plain weights before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .artifacts import LoadedModel, load_model, read_manifest, resolve_model_path, save_model
from .data import DataConfig, TokenShards, is_data_folder, prepare_data, prepared_matches
from .errors import ConfigError, DataError
from .evaluation import mean_loss, model_logits_fn, perplexity
from .finetune_data import (TEMPLATE_FILE, check_known_labels, label_set, random_split, read_instructions,
                            read_labelled, resolve_template, safe_label, stratified_split, BucketBatches)
from .lora import LORA_TARGETS, apply_lora, count_parameters, merge_lora
from .training import (claim_output, LoopConfig, WindowBatches, cleanup_distributed, lm_loss, run_loop,
                       setup_runtime)

STAGE = "finetune"


@dataclass
class FinetuneConfig(LoopConfig):
    """Settings of the finetuning stage; one CLI flag per field; saved in the artifact."""

    model: str = ""  # parent model folder (or hub id)
    task: str = "instruct"  # lm, instruct or classify
    data: str = ""  # lm: text/folder/glob/JSONL/prepared data; instruct: JSON/JSONL; classify: TSV/CSV/JSONL
    out: str = ""
    val_data: str | None = None  # held-out file; default: a split of data
    val_fraction: float = 0.1  # share held out when val_data is not given (stratified for classify)
    max_length: int | None = None  # tokens per example / window; default the model's n_positions
    template: str = "alpaca"  # instruct: built-in template name or JSON file
    min_response_tokens: int = 32  # instruct: response tokens kept when an example is too long
    text_field: str = "text"
    label_field: str = "label"
    columns: str = "auto"  # classify CSV/TSV without header: e.g. "label,text"
    lora_rank: int = 0  # 0: full finetuning; R > 0: rank-R adapters, base frozen, merged on save
    lora_alpha: float = 16.0  # adapter scale is alpha / rank
    lora_targets: str = ",".join(LORA_TARGETS)
    eval_max_tokens: int = 65536  # lm: tokens scored per perplexity report
    eval_samples: int = 3  # instruct: held-out prompts answered before and after
    sample_tokens: int = 64  # instruct: tokens per sample answer
    # Loop settings with finetuning defaults (a short run at a low rate on a trained model).
    max_steps: int = 300
    batch_size: int = 16
    lr: float | None = None  # default 3e-4 full, 2e-3 LoRA
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 100
    checkpoint_interval: int = 100

    def resolve(self) -> "FinetuneConfig":
        """Fill the defaults that depend on other settings, then validate."""
        if self.lr is None:
            self.lr = 2e-3 if self.lora_rank > 0 else 3e-4
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.validate()
        return self

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.lr is None or self.min_lr is None:
            raise ConfigError("lr and min_lr are unset; call resolve() first")
        super().validate()
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (0 = full finetuning), got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.eval_samples < 0 or self.sample_tokens < 1 or self.min_response_tokens < 1:
            raise ConfigError("--eval-samples must be >= 0, --sample-tokens and --min-response-tokens >= 1")

    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskRun:
    """What a task hands to the shared stage: the model to train and how to train, judge and
    save it."""

    model: nn.Module
    batches: object  # a training.BatchSource
    loss_fn: Callable
    evaluate: Callable[[nn.Module], dict]  # quick validation inside the loop
    report: Callable[[nn.Module, str], dict]  # the full held-out report; phase "before" or "after"
    save: Callable[[Path, nn.Module, dict, dict], None]  # (out, model, metrics, extra)
    fingerprint: dict
    train_also: tuple[str, ...] = ()  # modules trained in full under LoRA (new heads)
    extra: dict = field(default_factory=dict)


def _max_length(config: FinetuneConfig, parent: LoadedModel) -> int:
    n = parent.model.config.n_positions
    if config.max_length is not None and config.max_length > n:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's {n} positions; use {n} or less")
    return config.max_length or n


# ---------------------------------------------------------------------------------------
# lm: continued pretraining on domain text


def _lm_task(config: FinetuneConfig, parent: LoadedModel, log) -> TaskRun:
    tok = parent.tokenizer
    block = _max_length(config, parent)
    data_dir = _domain_data(config, parent, log)
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    train.check_window(block)
    val_tokens = torch.from_numpy(val.all_tokens()[: config.eval_max_tokens].astype(np.int64))
    if val_tokens.numel() < 2:
        raise DataError(f"the held-out split of {config.data} has {val_tokens.numel()} tokens; give more text")
    general = _general_tokens(parent, config.eval_max_tokens, log)
    windows = val.fixed_windows(16, min(block, val.n_tokens - 1))
    val_batches = [(torch.cat([x for x, _ in windows]), torch.cat([y for _, y in windows]))]

    def evaluate(model):
        loss = mean_loss(model, val_batches, next(model.parameters()).device, contextlib.nullcontext())
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def report(model, phase):
        device = next(model.parameters()).device
        fn = model_logits_fn(model, device)
        out = {"domain_val_ppl": perplexity(fn, val_tokens, block).perplexity, "domain_val_tokens": int(val_tokens.numel())}
        if general is not None:
            out["general_val_ppl"] = perplexity(fn, general, block).perplexity
            out["general_val_tokens"] = int(general.numel())
        return out

    def save(out, model, metrics, extra):
        save_model(out, model, tok, stage=STAGE, settings=config.to_dict(), parent=config.model, metrics=metrics,
                   extra={**extra, "data": str(data_dir)})

    return TaskRun(model=parent.model, batches=WindowBatches(train, config.batch_size, block), loss_fn=lm_loss,
                   evaluate=evaluate, report=report, save=save,
                   fingerprint={"data": str(Path(data_dir).resolve()), "block": block})


def _domain_data(config: FinetuneConfig, parent: LoadedModel, log) -> Path:
    """A prepared data folder of the domain text, tokenized with the parent's tokenizer."""
    tok = parent.tokenizer
    if is_data_folder(config.data):
        if (Path(config.data) / "tokenizer.json").read_text() != tok.to_json():
            raise ConfigError(f"{config.data} was tokenized with another tokenizer than {config.model}'s; "
                              "pass the raw text as --data so it is tokenized with the model's tokenizer")
        return Path(config.data)
    if config.val_data:
        raise ConfigError("--val-data is not used by the lm task: the held-out text is a document split of "
                          "--data (set its share with --val-fraction)")
    data_cfg = DataConfig(source=config.data, vocab_size=tok.vocab_size, val_fraction=config.val_fraction,
                          text_field=config.text_field)
    folder = Path(config.out) / "data"
    same_tok = (folder / "tokenizer.json").is_file() and (folder / "tokenizer.json").read_text() == tok.to_json()
    if not (same_tok and prepared_matches(folder, data_cfg)):
        log(f"tokenizing {config.data} with the parent's tokenizer...")
        prepare_data(data_cfg, folder, tokenizer=tok, log=log)
    return folder


def _general_tokens(parent: LoadedModel, limit: int, log) -> torch.Tensor | None:
    """The parent's own held-out text (how much general ability finetuning keeps), if known."""
    from .cli import eval_tokens

    try:
        tokens, source = eval_tokens(parent, None)
    except (ConfigError, DataError) as e:
        log(f"note: no general validation text for {parent.folder} ({e}); general perplexity not reported")
        return None
    return tokens[:limit] if tokens.numel() >= 2 else None


# ---------------------------------------------------------------------------------------
# instruct: instruction tuning with a stored prompt template


def instruct_split(config: FinetuneConfig):
    """(train records, held-out records) exactly as the stage splits them; `compactgpt eval`
    on an instruction-tuned model calls it again to rebuild the held-out set."""
    records = read_instructions(config.data)
    if config.val_data:
        return records, read_instructions(config.val_data)
    tr, va = random_split(len(records), config.val_fraction, config.seed)
    return [records[i] for i in tr], [records[i] for i in va]


def _instruct_task(config: FinetuneConfig, parent: LoadedModel, log) -> TaskRun:
    from . import finetune_instruct as fi

    tok = parent.tokenizer
    max_len = _max_length(config, parent)
    template = resolve_template(config.template)
    train_recs, val_recs = instruct_split(config)
    encode = lambda r: fi.encode_instruction(tok, template, r, max_len, config.min_response_tokens)
    train_ex = [encode(r) for r in train_recs]
    val_ex = [encode(r) for r in val_recs]
    truncated = sum(1 for r, (ids, _) in zip(train_recs, train_ex) if len(ids) == max_len)
    if truncated:
        log(f"note: {truncated} of {len(train_ex)} training examples reach --max-length {max_len} and were truncated")
    train_batches = fi.make_batches(train_ex, config.batch_size, tok.eot_id)
    val_batches = fi.make_batches(val_ex, config.batch_size, tok.eot_id)
    samples = val_recs[: config.eval_samples]
    sample_log: list[dict] = [{"where": r.where, "instruction": r.instruction, "input": r.input,
                               "reference": r.output} for r in samples]

    def report(model, phase):
        out = {**fi.heldout_response_loss(model, val_batches), "val_examples": len(val_ex)}
        for rec, entry in zip(samples, sample_log):
            entry[phase] = fi.generate_response(model, tok, template.prompt(rec.instruction, rec.input),
                                              min(config.sample_tokens, max_len - 1))
        return out

    def save(out, model, metrics, extra):
        write = lambda p: p.write_text(json.dumps(template.to_dict(), indent=2), encoding="utf-8")
        save_model(out, model, tok, stage=STAGE, settings=config.to_dict(), parent=config.model, metrics=metrics,
                   extra={**extra, "template": template.to_dict(), "samples": sample_log},
                   extra_files={TEMPLATE_FILE: write})

    return TaskRun(model=parent.model, batches=BucketBatches(train_batches), loss_fn=fi.response_loss,
                   evaluate=lambda m: {k: v for k, v in fi.heldout_response_loss(m, val_batches).items()
                                       if k != "val_response_tokens"},
                   report=report, save=save,
                   fingerprint={"data": config.data, "val_data": config.val_data, "template": template.to_dict(),
                                "max_length": max_len},
                   extra={"train_examples": len(train_ex), "val_examples": len(val_ex), "truncated": truncated,
                          "samples": sample_log})


# ---------------------------------------------------------------------------------------
# classify: a label head on the last real token


def classify_split(config: FinetuneConfig):
    """(train examples, held-out examples, label names) exactly as the stage splits them;
    `compactgpt eval` on a classifier calls it again to rebuild the held-out set."""
    examples = read_labelled(config.data, config.text_field, config.label_field, config.columns)
    if config.val_data:
        train, val = examples, read_labelled(config.val_data, config.text_field, config.label_field, config.columns)
    else:
        tr, va = stratified_split([e.label for e in examples], config.val_fraction, config.seed)
        train, val = [examples[i] for i in tr], [examples[i] for i in va]
    labels = label_set(train, config.data)
    check_known_labels(val, labels)
    return train, val, labels


def _classify_task(config: FinetuneConfig, parent: LoadedModel, log) -> TaskRun:
    from . import finetune_classify as fc

    tok = parent.tokenizer
    max_len = _max_length(config, parent)
    train, val, labels = classify_split(config)
    index = {name: i for i, name in enumerate(labels)}
    train_y = [index[e.label] for e in train]
    val_y = [index[e.label] for e in val]
    majority, baseline = fc.majority_baseline(train_y, val_y)
    log(f"{len(train)} training / {len(val)} held-out examples, labels {labels}; majority class "
        f"{labels[majority]!r} scores {baseline:.4f} on the held-out set")
    seqs = fc.encode_texts(tok, [e.text for e in train], max_len)
    batches = fc.make_batches(seqs, train_y, config.batch_size, tok.eot_id)
    torch.manual_seed(config.seed)  # the head's initial weights
    model = fc.GPTClassifier(parent.model, len(labels))

    def report(m, phase):
        r = fc.evaluate_examples(m, tok, val, labels, max_len)
        out = {"val_accuracy": r["accuracy"], "val_macro_f1": r["macro_f1"], "val_loss": r["loss"],
               "val_examples": r["examples"], "majority_baseline_accuracy": baseline}
        for name, stats in r["per_class"].items():
            out[f"val_recall_{safe_label(name)}"] = stats["recall"]
            out[f"val_precision_{safe_label(name)}"] = stats["precision"]
        out["confusion"] = r["confusion"]
        return out

    def evaluate(m):
        r = fc.evaluate_examples(m, tok, val, labels, max_len)
        return {"val_accuracy": r["accuracy"], "val_loss": r["loss"]}

    def save(out, m, metrics, extra):
        fc.save_classifier(out, m, tok, labels, stage=STAGE, settings=config.to_dict(), parent=config.model,
                           metrics=metrics, extra=extra)

    return TaskRun(model=model, batches=BucketBatches(batches), loss_fn=fc.classification_loss, evaluate=evaluate,
                   report=report, save=save, train_also=("score",),
                   fingerprint={"data": config.data, "val_data": config.val_data, "labels": labels,
                                "max_length": max_len},
                   extra={"train_examples": len(train), "val_examples": len(val),
                          "label_counts": {l: train_y.count(i) for i, l in enumerate(labels)}})


# Task name -> builder(config, parent, log) -> TaskRun.
TASKS: dict[str, Callable[[FinetuneConfig, LoadedModel, Callable], TaskRun]] = {
    "lm": _lm_task,
    "instruct": _instruct_task,
    "classify": _classify_task,
}


# ---------------------------------------------------------------------------------------
# The stage


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print, progress: bool = True,
             overwrite: bool = False, resume: bool = False,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Finetune config.model on config.data for config.task and write an artifact to config.out.

    Returns the metrics written to the manifest (held-out figures before and after, trainable
    parameters, ...). Raises ConfigError when out holds a checkpoint and neither resume nor
    overwrite is given, DataError for bad data (naming the file and line).
    """
    config.resolve()
    out = Path(config.out)
    if Path(config.model).resolve() == out.resolve():
        raise ConfigError("--out must differ from --model: the parent is never overwritten")
    claim_output(out, resume, overwrite)
    model_path = resolve_model_path(config.model)
    rt = setup_runtime(config)
    parent = load_model(model_path)
    parent_manifest = parent.manifest
    out.mkdir(parents=True, exist_ok=True)
    run = TASKS[config.task](config, parent, log)

    log("measuring the held-out set before finetuning...")
    before = run.report(run.model, "before")
    lora = None
    if config.lora_rank > 0:
        wrapped = apply_lora(run.model, config.lora_rank, config.lora_alpha, config.targets(), run.train_also)
        lora = {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.targets()),
                "layers": wrapped}
    trainable, total = count_parameters(run.model)
    log(f"task {config.task}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
        + (f", LoRA rank {config.lora_rank} on {lora['layers']} layers" if lora else ""))
    fingerprint = {"task": config.task, "parent": str(model_path), "lora": lora, **run.fingerprint}
    result = run_loop(run.model, config, out, run.batches, run.loss_fn, run.evaluate, runtime=rt,
                      fingerprint=fingerprint, resume=resume, log=log, progress=progress, on_step=on_step,
                      desc=f"finetune {config.task}")
    model = result.model
    if lora:
        merge_lora(model)
    model.eval()
    metrics = {k: v for k, v in result.metrics.items() if k in ("steps", "train_tokens", "train_seconds", "tokens_per_s")}
    if rt.is_main:
        after = run.report(model, "after")
        metrics.update({f"before_{k}": v for k, v in before.items() if k not in _SAME_BEFORE_AND_AFTER})
        metrics.update({k: v for k, v in after.items() if k != "confusion"})
        if "confusion" in after:
            metrics["confusion"] = after["confusion"]
        metrics["trainable_parameters"] = trainable
        metrics["total_parameters"] = total
        metrics["trainable_fraction"] = trainable / total
        extra = {"task": config.task, "lora": lora, "parent_stage": parent_manifest.stage if parent_manifest else None,
                 **run.extra}
        run.save(out, model.cpu(), metrics, extra)
        log(summary(config.task, metrics))
    if rt.distributed:
        torch.distributed.barrier()
        cleanup_distributed()
    return metrics


# Report entries that describe the held-out set, not the model: recorded once.
_SAME_BEFORE_AND_AFTER = {"confusion", "val_examples", "majority_baseline_accuracy", "domain_val_tokens",
                          "general_val_tokens", "val_response_tokens"}


def summary(task: str, metrics: dict) -> str:
    """A few lines with the before/after figures of a finetuning run."""
    lines = [f"finetuned ({task}), {metrics['trainable_parameters']:,} trainable parameters "
             f"({100 * metrics['trainable_fraction']:.2f}%):"]
    for key in ("val_response_ppl", "domain_val_ppl", "general_val_ppl", "val_accuracy", "val_macro_f1"):
        if key in metrics:
            before = metrics.get(f"before_{key}")
            lines.append(f"  {key}: {before:.4f} -> {metrics[key]:.4f}" if before is not None else f"  {key}: {metrics[key]:.4f}")
    if "majority_baseline_accuracy" in metrics:
        lines.append(f"  majority-class baseline accuracy: {metrics['majority_baseline_accuracy']:.4f}")
    if "confusion" in metrics:
        from .finetune_classify import format_confusion

        lines.append("  confusion (rows true, columns predicted):")
        lines += ["    " + l for l in format_confusion(metrics["confusion"]).splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line

FINETUNE_HELP = {
    "val_data": "held-out file in the --data format (default: hold out --val-fraction of --data)",
    "val_fraction": "share of --data held out when --val-data is not given (stratified by label for classify)",
    "max_length": "tokens per example (instruct/classify) or training window (lm); default the model's n_positions",
    "template": "instruct: prompt template, a built-in name (alpaca, compact) or a JSON file with "
                "with_input and without_input, each ending in {response}",
    "min_response_tokens": "instruct: response tokens kept when an example exceeds --max-length "
                           "(the prompt's beginning is cut instead)",
    "text_field": "field or column holding the text (JSONL/CSV/TSV with a header)",
    "label_field": "classify: field or column holding the label",
    "columns": "classify: column order of a CSV/TSV without header, e.g. label,text (default auto: the "
               "column with fewer distinct values is the label)",
    "lora_rank": "LoRA rank; 0 (default) finetunes every weight. Adapters are merged into plain weights on save",
    "lora_alpha": "LoRA scale numerator (scale = alpha / rank)",
    "lora_targets": "comma-separated module suffixes that get adapters",
    "eval_max_tokens": "lm: tokens scored per perplexity figure",
    "eval_samples": "instruct: held-out prompts answered before and after (stored in the manifest)",
    "sample_tokens": "instruct: max tokens per sample answer",
    "max_steps": "optimizer steps", "batch_size": "examples (or windows) per micro-step",
    "grad_accum": "micro-steps per optimizer step", "lr": "peak learning rate (default 3e-4; 2e-3 with LoRA)",
    "min_lr": "final learning rate (default lr / 10)", "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "max gradient norm (0: off)", "eval_interval": "steps between validations",
    "checkpoint_interval": "steps between checkpoints", "log_interval": "steps between log lines",
    "seed": "random seed (split, head init, batch order)", "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16", "compile": "torch.compile the model",
}


def register(sub, commands: dict) -> None:
    """Add the `finetune` and `classify` verbs."""
    from .cli import add_config_args

    p = sub.add_parser(
        "finetune", help="finetune a model: domain text, instructions or classification (optionally LoRA)",
        description="Finetune a model folder and write a new one whose manifest names the parent and the task. "
        "Tasks: lm (continued pretraining on domain text; perplexity on the domain's and the original "
        "held-out text, before and after), instruct (Alpaca-style JSON with instruction/input/output; "
        "loss on the response only; the prompt template is stored and reused by `generate`), classify "
        "(TSV/CSV/JSONL of text and label; a head on the last real token; accuracy and confusion matrix). "
        "--lora-rank trains low-rank adapters with the base frozen and merges them on save.")
    p.add_argument("--model", required=True, help="parent model folder")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="what to finetune for")
    p.add_argument("--data", required=True, help="training data (format depends on --task)")
    p.add_argument("--out", required=True, help="artifact folder to write (checkpoints in OUT/checkpoint)")
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    helps = {k: text + (f" (default {defaults[k]})" if defaults.get(k) not in (None, "") and "default" not in text else "")
             for k, text in FINETUNE_HELP.items()}
    add_config_args(p, FinetuneConfig, helps, skip=("model", "task", "data", "out"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard an existing checkpoint in OUT and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("classify", help="predict labels with a classifier artifact",
                       description="Print the predicted label (and probabilities with --json) of each text.")
    p.add_argument("--model", required=True, help="classifier folder (compactgpt finetune --task classify)")
    p.add_argument("--text", action="append", default=[], help="text to classify (repeat for several)")
    p.add_argument("--file", help="classify every non-empty line of this file")
    p.add_argument("--json", action="store_true", help="print JSON lines with label and probabilities")
    p.add_argument("--threads", type=int, help="CPU threads")
    commands["finetune"] = cmd_finetune
    commands["classify"] = cmd_classify


def cmd_finetune(args) -> None:
    names = [f.name for f in dataclasses.fields(FinetuneConfig)]
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    config = FinetuneConfig(**given)
    err = lambda m: print(m, file=sys.stderr)
    metrics = finetune(config, log=err, progress=not args.no_progress, overwrite=args.overwrite, resume=args.resume)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(config.out)


def cmd_classify(args) -> None:
    from .finetune_classify import classify_texts, load_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise DataError(f"--file {path} does not exist")
        texts += [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not texts:
        raise ConfigError("nothing to classify: pass --text TEXT (repeatable) or --file FILE")
    loaded = load_classifier(resolve_model_path(args.model))
    for text, result in zip(texts, classify_texts(loaded, texts)):
        if args.json:
            print(json.dumps({"text": text, **result}))
        else:
            p = result["probabilities"][result["label"]]
            print(f"{result['label']}\t{p:.3f}\t{text}")


def eval_finetuned(args) -> bool:
    """`compactgpt eval` for artifacts that perplexity on plain text does not describe: a
    classifier (accuracy), and an instruction-tuned model without --data (held-out response
    perplexity). Returns False when the plain perplexity evaluation applies."""
    from .finetune_classify import is_classifier

    folder = resolve_model_path(args.model)
    reference = getattr(args, "reference", None)
    for f in [folder] + ([resolve_model_path(reference)] if reference else []):
        if reference and is_classifier(f):
            raise ConfigError(
                f"{f} is a classifier: --reference compares language models' next-token distributions; "
                "evaluate a classifier alone (accuracy), or compare two language models"
            )
    if is_classifier(folder):
        cmd_eval_classifier(args)
        return True
    manifest = read_manifest(folder)
    if reference is None and args.data is None and manifest is not None and manifest.stage == STAGE and manifest.settings.get("task") == "instruct":
        cmd_eval_instruct(args, folder, manifest)
        return True
    return False


def _settings_config(settings: dict) -> FinetuneConfig:
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in settings.items() if k in known})


def cmd_eval_instruct(args, folder: Path, manifest) -> None:
    """Held-out response loss and perplexity of an instruction-tuned model, on the split its
    finetuning held out (rebuilt from the manifest's settings)."""
    from . import finetune_instruct as fi

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    loaded = load_model(folder)
    config = _settings_config(manifest.settings)
    template = fi.stored_template(folder)
    if template is None:
        raise ConfigError(f"{folder} lacks {TEMPLATE_FILE}; the folder is incomplete")
    max_len = min(args.max_length or config.max_length or loaded.model.config.n_positions,
                  loaded.model.config.n_positions)
    _, val = instruct_split(config)
    examples = [fi.encode_instruction(loaded.tokenizer, template, r, max_len, config.min_response_tokens) for r in val]
    result = fi.heldout_response_loss(loaded.model, fi.make_batches(examples, 16, loaded.tokenizer.eot_id))
    record = {"model": str(args.model), "data": f"held-out split of {config.data}", "examples": len(examples), **result}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"response perplexity {result['val_response_ppl']:.4f} (loss {result['val_response_loss']:.4f}) over "
              f"{result['val_response_tokens']:,} response tokens of {len(examples)} held-out examples of {config.data}")


def cmd_eval_classifier(args) -> None:
    """`compactgpt eval` on a classifier: accuracy and confusion matrix on --data, or on the
    held-out split the stage used (rebuilt from the manifest's settings)."""
    from .finetune_classify import evaluate_examples, format_confusion, load_classifier

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    loaded = load_classifier(resolve_model_path(args.model))
    settings = loaded.manifest.settings if loaded.manifest else {}
    max_length = args.max_length or settings.get("max_length") or loaded.model.config.n_positions
    if args.data:
        examples = read_labelled(args.data, settings.get("text_field", "text"), settings.get("label_field", "label"),
                                 settings.get("columns", "auto"))
        source = args.data
    elif settings.get("task") == "classify":
        _, examples, _ = classify_split(_settings_config(settings))
        source = f"held-out split of {settings['data']}"
    else:
        raise ConfigError(f"{loaded.folder} records no training data to hold out from; pass --data with labelled text")
    check_known_labels(examples, loaded.labels)
    r = evaluate_examples(loaded.model, loaded.tokenizer, examples, loaded.labels, max_length)
    record = {"model": str(args.model), "data": source, "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
              "loss": r["loss"], "examples": r["examples"], "per_class": r["per_class"], "confusion": r["confusion"]}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"accuracy {r['accuracy']:.4f} (macro F1 {r['macro_f1']:.4f}) over {r['examples']:,} examples of {source}")
        print(format_confusion(r["confusion"]))


def prompt_for_generation(folder: str | Path, prompt: str) -> str:
    """The text `generate` feeds the model: the prompt inside the artifact's stored template
    (as the instruction) when it has one, else the prompt as is."""
    from .finetune_instruct import stored_template

    template = stored_template(folder)
    return template.prompt(prompt) if template is not None and prompt else prompt
