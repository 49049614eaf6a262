"""Planners of the corpus and the teacher: the tokenizer and token shards (OUT/data), the
pretrained teacher (OUT/teacher) and, when the config asks for it, the teacher finetuned on
a task (OUT/teacher-ft), which then stands in for the teacher in every later group."""

from __future__ import annotations

from functools import partial
from typing import Callable

from ...data import DataConfig, prepare_data
from ...errors import ConfigError
from ...finetune import FinetuneConfig, finetune
from ...pretrain import TrainConfig, config_from_preset, pretrain
from .stages import Planning, Stage


def _run_corpus(config: DataConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    prepare_data(config, stage.folder, log=log)


def _run_pretrain(config: TrainConfig, log: Callable[[str], None], progress: bool, stage: Stage, resume: bool) -> None:
    pretrain(config, log=log, progress=progress, resume=resume, overwrite=not resume)


def _run_finetune(config: FinetuneConfig, log: Callable[[str], None], progress: bool, stage: Stage,
                  resume: bool) -> None:
    finetune(config, log=log, progress=progress, resume=resume, overwrite=not resume)


def plan_corpus(settings: dict, ctx: Planning) -> Stage:
    """The corpus stage: DataConfig fields -> tokenizer and shards in OUT/data."""
    config = DataConfig.from_dict(settings, "corpus")
    return ctx.add(Stage("corpus", "corpus", ctx.data_dir, config.to_dict(), [], partial(_run_corpus, config, ctx.log)))


def plan_teacher(settings: dict, ctx: Planning) -> Stage:
    """The teacher: a preset (default small) plus TrainConfig overrides, trained on the corpus."""
    overrides = dict(settings)
    preset = overrides.pop("preset", "small")
    for k in ("data", "out"):
        if k in overrides:
            raise ConfigError(f"teacher: '{k}' is set by the pipeline (corpus folder, OUT/teacher); remove it")
    config = config_from_preset(preset, data=str(ctx.data_dir), out=str(ctx.out / "teacher"), **overrides)
    ctx.teacher = ctx.add(Stage("teacher", "pretrain", ctx.out / "teacher", config.to_dict(), ["corpus"],
                                partial(_run_pretrain, config, ctx.log, ctx.progress), trains=True, model="teacher"))
    return ctx.teacher


def plan_finetune(settings: dict, ctx: Planning) -> Stage:
    """The teacher finetuned (FinetuneConfig fields); it takes over the model name 'teacher',
    so students, variants and bench rows named 'teacher' use the finetuned model."""
    pretrained = ctx.teacher
    config = FinetuneConfig.from_dict(dict(settings), "finetune", model=str(pretrained.folder),
                          out=str(ctx.out / "teacher-ft"))
    config.resolve()
    ctx.models.pop("teacher")
    pretrained.model = None
    ctx.teacher = ctx.add(Stage("teacher-ft", "finetune", ctx.out / "teacher-ft", config.to_dict(), ["teacher"],
                                partial(_run_finetune, config, ctx.log, ctx.progress), trains=True, model="teacher"))
    return ctx.teacher
