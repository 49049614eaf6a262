"""The plan: every stage of a pipeline config in order, each config built and validated
before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .benchmark import plan_bench
from .deploy import plan_deploy
from .stages import Planning, Stage
from .students import plan_students
from .teacher import existing_teacher, plan_corpus, plan_finetune, plan_teacher
from .variants import plan_exports, plan_quantize


def plan(config: dict, out: str | Path, log: Callable[[str], None] = print, progress: bool = True) -> list[Stage]:
    """The ordered stages of a config (as load_config returns it), fingerprinted. Raises
    ConfigError for an unknown stage, method, model name or setting; nothing runs before the
    whole plan is valid."""
    ctx = Planning(Path(out).resolve(), log, progress)
    plan_corpus(config["corpus"], ctx, tokenizer_from=existing_teacher(config["teacher"]))
    plan_teacher(config["teacher"], ctx)
    if config.get("finetune"):
        plan_finetune(config["finetune"], ctx)
    plan_students(config.get("students") or [], ctx)
    for spec in config.get("quantize") or []:
        plan_quantize(spec, ctx)
    plan_exports(config.get("export") or {}, ctx)
    for spec in config.get("deploy") or []:
        plan_deploy(spec, ctx)
    plan_bench(config["bench"], ctx)
    return ctx.seal()
