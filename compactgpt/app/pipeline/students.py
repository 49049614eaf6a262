"""Planner of the students: for each, an optional structured pruning of the teacher
(OUT/students/NAME/pruned) and then distillation from the teacher (OUT/students/NAME/distilled),
into the pruned model or into a fresh model of a given shape."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from distill import DistillConfig, PruneConfig, distill, prune
from distill.distill import parse_student_shape, training_window

from ...artifacts import read_config, resolve_model_path
from ...errors import ConfigError
from ...pretrain import ADOPT_STAGE
from .stages import Planning, Stage, fingerprint_settings

STUDENT_KEYS = ("name", "prune", "distill")


def _run_prune(config: PruneConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    prune(config, log=log)


def _run_distill(config: DistillConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    # Not resumed: start over (the folder holds no finished artifact).
    distill(config.replace(resume=resume, overwrite=not resume), log=log)


def _split_spec(spec: dict) -> tuple[str, dict | None, dict]:
    """(name, prune settings or None, distill settings) of one student entry."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ConfigError(f"students: every student needs a 'name', got {spec}")
    prune_settings = spec.pop("prune", None)
    distill_settings = spec.pop("distill", None)
    if spec:
        raise ConfigError(f"student {name}: unknown keys {sorted(spec)}; a student has {', '.join(STUDENT_KEYS)}")
    if distill_settings is None:
        raise ConfigError(f"student {name}: 'distill' settings are required (use {{}} for the defaults)")
    return name, prune_settings, dict(distill_settings)


def plan_student(spec: dict, ctx: Planning) -> Stage:
    """One student's stages; returns its distill stage (the artifact known by its name)."""
    name, prune_settings, d = _split_spec(spec)
    teacher = ctx.teacher
    folder = ctx.out / "students" / name
    if prune_settings is not None:
        p_cfg = PruneConfig.from_dict(prune_settings, f"student {name} prune", model=str(teacher.folder),
                                      out=str(folder / "pruned"), data=str(ctx.data_dir), progress=ctx.progress)
        ctx.add(Stage(f"{name}/prune", "prune", Path(p_cfg.out), p_cfg.fingerprint_dict(), [teacher.name],
                      partial(_run_prune, p_cfg, ctx.log)))
        parents = [teacher.name, f"{name}/prune"]
        student_src = p_cfg.out
    else:
        if "student" not in d:
            raise ConfigError(f"student {name}: without 'prune', distill needs 'student' (a shape such as "
                              "n_layer=2,n_embd=128,n_head=2)")
        student_src = d.pop("student")
        parents = [teacher.name]
    d_cfg = DistillConfig.from_dict(d, f"student {name} distill", teacher=str(teacher.folder), student=student_src,
                                    out=str(folder / "distilled"), data=str(ctx.data_dir), progress=ctx.progress)
    settings = fingerprint_settings(d_cfg, ("device",))  # saved before it became a run setting
    settings["block_size"] = _planned_window(d_cfg.block_size, ctx, None if prune_settings else student_src)
    if prune_settings is None:
        settings["student_shape"] = student_src  # a shape is a setting, not a folder
    return ctx.add(Stage(f"{name}/distill", "distill", Path(d_cfg.out), settings, parents,
                         partial(_run_distill, d_cfg, ctx.log), trains=True, model=name))


def _planned_window(block_size: int, ctx: Planning, shape: str | None) -> int:
    """The training window distill will use (distill's training_window), as far as the plan
    knows both models: a window that follows the models (0) is fingerprinted as the size it
    resolves to, so a run made when the default was a fixed size stays up to date."""
    if block_size:
        return block_size
    teacher = _teacher_positions(ctx)
    if teacher is None:
        return 0
    student = parse_student_shape(shape).get("n_positions", teacher) if shape else teacher  # pruning keeps it
    return training_window(0, teacher, student)


def _teacher_positions(ctx: Planning) -> int | None:
    """The teacher's n_positions: from the pretraining settings (a finetuned teacher keeps
    them) or an existing model's config.json; None where the plan cannot tell."""
    stages = {s.name: s for s in ctx.stages}
    stage = ctx.teacher
    while stage is not None:
        if "n_positions" in stage.settings:
            return int(stage.settings["n_positions"])
        if stage.kind == ADOPT_STAGE:
            return read_config(resolve_model_path(stage.settings["model"])).n_positions
        stage = stages.get(stage.parents[0]) if stage.parents else None
    return None


def plan_students(specs: list[dict], ctx: Planning) -> None:
    """Every student of the config, in order."""
    for spec in specs:
        plan_student(spec, ctx)
