"""Planners of the corpus and the teacher: the tokenizer and token shards (OUT/data), the
teacher (OUT/teacher: pretrained, or an existing model given as {"model": folder or hub id},
whose tokenizer then tokenizes the corpus) and, when the config asks for it, the teacher
finetuned on a task (OUT/teacher-ft), which then stands in for the teacher in every later
group."""

from __future__ import annotations

from functools import partial
from typing import Callable

from ...artifacts import folder_hash, resolve_model_path
from ...data import DataConfig, prepare_data
from ...errors import ConfigError
from ...finetune import FinetuneConfig, finetune
from ...io import sha256_file
from ...pretrain import ADOPT_STAGE, AdoptConfig, TrainConfig, adopt_teacher, config_from_preset, pretrain
from .stages import Planning, Stage, fingerprint_settings

# The training stages saved their device before it became a run setting.
FORMERLY_SAVED = ("device",)


def _run_corpus(config: DataConfig, tokenizer_from: str | None, log: Callable[[str], None], stage: Stage,
                resume: bool) -> None:
    tokenizer = str(resolve_model_path(tokenizer_from)) if tokenizer_from else None
    prepare_data(config.replace(out=str(stage.folder), tokenizer=tokenizer), log=log)


def _run_adopt(config: AdoptConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    adopt_teacher(config, log=log)


# A training stage that is not resumed starts over: its folder holds no finished artifact.
def _run_pretrain(config: TrainConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    pretrain(config.replace(resume=resume, overwrite=not resume), log=log)


def _run_finetune(config: FinetuneConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    finetune(config.replace(resume=resume, overwrite=not resume), log=log)


def existing_teacher(settings: dict) -> str | None:
    """The model a teacher group names ({"model": folder or hub id}), or None to pretrain one."""
    source = settings.get("model")
    if source is None:
        return None
    extra = sorted(set(settings) - {"model"})
    if extra:
        raise ConfigError(f"teacher: {extra} cannot be combined with 'model' (an existing model is not trained); "
                          "remove them, or remove 'model' to pretrain a teacher")
    return str(source)


def plan_corpus(settings: dict, ctx: Planning, tokenizer_from: str | None = None) -> Stage:
    """The corpus stage: DataConfig fields -> tokenizer and shards in OUT/data. With
    `tokenizer_from` (an existing teacher) the corpus is encoded with that model's tokenizer
    instead of a new one; the tokenizer's hash joins the fingerprint."""
    config = DataConfig.from_dict(settings, "corpus")
    record = config.to_dict()
    if tokenizer_from:
        record["tokenizer_sha256"] = sha256_file(resolve_model_path(tokenizer_from) / "tokenizer.json")
    return ctx.add(Stage("corpus", "corpus", ctx.data_dir, record, [],
                         partial(_run_corpus, config, tokenizer_from, ctx.log)))


def plan_teacher(settings: dict, ctx: Planning) -> Stage:
    """The teacher: a preset (default small) plus TrainConfig overrides, trained on the corpus;
    or an existing model ({"model": ...}), adopted as it is (no pretraining)."""
    source = existing_teacher(settings)
    if source is not None:
        folder = resolve_model_path(source)  # a missing folder fails here, before any work
        record = {"model": source, "source_sha256": folder_hash(folder)}
        config = AdoptConfig(model=source, data=str(ctx.data_dir), out=str(ctx.out / "teacher"), progress=ctx.progress)
        ctx.teacher = ctx.add(Stage("teacher", ADOPT_STAGE, ctx.out / "teacher", record, ["corpus"],
                                    partial(_run_adopt, config, ctx.log), model="teacher"))
        return ctx.teacher
    overrides = dict(settings)
    preset = overrides.pop("preset", "small")
    for k in ("data", "out"):
        if k in overrides:
            raise ConfigError(f"teacher: '{k}' is set by the pipeline (corpus folder, OUT/teacher); remove it")
    config = config_from_preset(preset, data=str(ctx.data_dir), out=str(ctx.out / "teacher"),
                                progress=ctx.progress, **overrides)
    settings = fingerprint_settings(config, FORMERLY_SAVED)
    ctx.teacher = ctx.add(Stage("teacher", "pretrain", ctx.out / "teacher", settings, ["corpus"],
                                partial(_run_pretrain, config, ctx.log), trains=True, model="teacher"))
    return ctx.teacher


def plan_finetune(settings: dict, ctx: Planning) -> Stage:
    """The teacher finetuned (FinetuneConfig fields); it takes over the model name 'teacher',
    so students, variants and bench rows named 'teacher' use the finetuned model."""
    pretrained = ctx.teacher
    config = FinetuneConfig.from_dict(dict(settings), "finetune", model=str(pretrained.folder),
                                      out=str(ctx.out / "teacher-ft"), progress=ctx.progress)
    ctx.models.pop("teacher")
    pretrained.model = None
    settings = fingerprint_settings(config, FORMERLY_SAVED)
    ctx.teacher = ctx.add(Stage("teacher-ft", "finetune", ctx.out / "teacher-ft", settings, ["teacher"],
                                partial(_run_finetune, config, ctx.log), trains=True, model="teacher"))
    return ctx.teacher
