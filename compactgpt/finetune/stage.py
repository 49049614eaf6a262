"""The finetuning stage: one runner for every task.

A task (see TASKS) turns the parent model and the data into a TaskRun: what the shared
training loop needs (the model to train, batches, a loss, a quick validation) plus a
held-out report computed before and after training, and the writer of its artifact. Every
task runs through `training.run_loop` inside `training.training_stage`, so finetuning gets
the same schedule, clipping, bf16 on CUDA, checkpoints, exact resume and process-group
clean-up as pretraining. With lora_rank R the parent's weights are frozen, adapters train,
and they are merged into plain weights before saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..artifacts import LoadedModel, load_model, resolve_model_path
from ..device import cpu_threads
from ..training import run_loop, training_stage
from .classify import classify_task, format_confusion
from .config import STAGE, TASK_NAMES, FinetuneConfig
from .instruct import instruct_task
from .lm import lm_task
from .lora import apply_lora, merge_lora, trainable_parameters
from .task import TaskRun

# Task name -> builder(config, parent, log) -> TaskRun.
TASKS: dict[str, Callable[[FinetuneConfig, LoadedModel, Callable[[str], None]], TaskRun]] = {
    "lm": lm_task,
    "instruct": instruct_task,
    "classify": classify_task,
}
assert tuple(TASKS) == TASK_NAMES, "config.TASK_NAMES and TASKS must name the same tasks"

# Report entries that describe the held-out set, not the model: recorded once.
_SAME_BEFORE_AND_AFTER = {"confusion", "val_examples", "majority_baseline_accuracy", "domain_val_tokens",
                          "general_val_tokens", "val_response_tokens"}

# Loop figures that go into the manifest.
_LOOP_METRICS = ("steps", "train_tokens", "train_seconds", "tokens_per_s")


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print,
             on_step: Callable[[int], None] | None = None) -> Path:
    """Finetune config.model on config.data for config.task and write an artifact to config.out.

    Returns the folder; its manifest's metrics hold the held-out figures before and after and
    the trainable parameters. on_step: called after every optimizer step. Raises ConfigError
    when out is the parent folder, or holds a checkpoint and neither config.resume nor
    config.overwrite is set; DataError for bad data (naming the file and line).
    """
    config.resolve()
    out = Path(config.out)
    inputs = {"--model": config.model, "--data": config.data, "--val-data": config.val_data}
    with cpu_threads(config.threads), training_stage(config, out, resume=config.resume, overwrite=config.overwrite,
                                                     inputs=inputs, stage=STAGE) as rt:
        model_path = resolve_model_path(config.model)
        parent = load_model(model_path)
        out.mkdir(parents=True, exist_ok=True)
        run = TASKS[config.task](config, parent, log)

        log("measuring the held-out set before finetuning...")
        before = run.report(run.model, "before")
        lora = _attach_lora(run, config)
        trainable, total = trainable_parameters(run.model)
        log(f"task {config.task}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
            + (f", LoRA rank {config.lora_rank} on {lora['layers']} layers" if lora else ""))
        fingerprint = {"task": config.task, "parent": str(model_path), "lora": lora, **run.fingerprint}
        result = run_loop(run.model, config, out, run.batches, run.loss_fn, run.evaluate, runtime=rt,
                          fingerprint=fingerprint, resume=config.resume, log=log, progress=config.progress,
                          on_step=on_step, desc=f"finetune {config.task}")
        model = result.model
        if lora:
            merge_lora(model)
        model.eval()
        metrics = {k: v for k, v in result.metrics.items() if k in _LOOP_METRICS}
        if rt.is_main:
            metrics.update(_before_and_after(before, run.report(model, "after")))
            metrics.update(trainable_parameters=trainable, total_parameters=total, trainable_fraction=trainable / total)
            extra = {"task": config.task, "lora": lora,
                     "parent_stage": parent.manifest.stage if parent.manifest else None, **run.extra}
            run.save(out, model.cpu(), metrics, extra)
            log(summary(config.task, metrics))
    return out


def _attach_lora(run: TaskRun, config: FinetuneConfig) -> dict | None:
    """Wrap the run's model in adapters when config.lora_rank > 0; the manifest's record of them."""
    if config.lora_rank <= 0:
        return None
    torch.manual_seed(config.seed)  # the adapters' initial weights depend on the seed alone
    wrapped = apply_lora(run.model, config.lora_rank, config.lora_alpha, config.targets(), run.train_also)
    return {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.targets()),
            "layers": wrapped}


def _before_and_after(before: dict, after: dict) -> dict:
    """The held-out figures for the manifest: before_* for what changes, then the after
    figures, with the confusion matrix last."""
    metrics = {f"before_{k}": v for k, v in before.items() if k not in _SAME_BEFORE_AND_AFTER}
    metrics.update({k: v for k, v in after.items() if k != "confusion"})
    if "confusion" in after:
        metrics["confusion"] = after["confusion"]
    return metrics


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
        lines.append("  confusion (rows true, columns predicted):")
        lines += ["    " + l for l in format_confusion(metrics["confusion"]).splitlines()]
    return "\n".join(lines)
