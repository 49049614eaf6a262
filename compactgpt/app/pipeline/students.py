"""Planner of the students: for each, an optional structured pruning of the teacher
(OUT/students/NAME/pruned) and then distillation from the teacher (OUT/students/NAME/distilled),
into the pruned model or into a fresh model of a given shape."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from distill import DistillConfig, PruneConfig, distill, prune

from ...errors import ConfigError
from .stages import Planning, Stage

STUDENT_KEYS = ("name", "prune", "distill")


def _run_prune(config: PruneConfig, log: Callable[[str], None], progress: bool, stage: Stage, resume: bool) -> None:
    prune(config, log=log, progress=progress)


def _run_distill(config: DistillConfig, log: Callable[[str], None], progress: bool, stage: Stage,
                 resume: bool) -> None:
    distill(config, log=log, progress=progress, resume=resume, overwrite=not resume)


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
                             out=str(folder / "pruned"), data=str(ctx.data_dir))
        p_cfg.validate()
        ctx.add(Stage(f"{name}/prune", "prune", Path(p_cfg.out), p_cfg.to_dict(), [teacher.name],
                      partial(_run_prune, p_cfg, ctx.log, ctx.progress)))
        parents = [teacher.name, f"{name}/prune"]
        student_src = p_cfg.out
    else:
        if "student" not in d:
            raise ConfigError(f"student {name}: without 'prune', distill needs 'student' (a shape such as "
                              "n_layer=2,n_embd=128,n_head=2)")
        student_src = d.pop("student")
        parents = [teacher.name]
    d_cfg = DistillConfig.from_dict(d, f"student {name} distill", teacher=str(teacher.folder),
                         student=student_src, out=str(folder / "distilled"), data=str(ctx.data_dir))
    d_cfg.validate()
    settings = d_cfg.to_dict()
    if prune_settings is None:
        settings["student_shape"] = student_src  # a shape is a setting, not a folder
    return ctx.add(Stage(f"{name}/distill", "distill", Path(d_cfg.out), settings, parents,
                         partial(_run_distill, d_cfg, ctx.log, ctx.progress), trains=True, model=name))


def plan_students(specs: list[dict], ctx: Planning) -> None:
    """Every student of the config, in order."""
    for spec in specs:
        plan_student(spec, ctx)
