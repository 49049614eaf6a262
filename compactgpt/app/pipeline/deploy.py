"""Planner of the deploy group: bundles of ONNX exports for where users run them (web,
transformers.js, genai, mobile), one stage per target and model: OUT/deploy/TARGET/MODEL."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from ..deploy import DeployConfig, deploy
from .stages import Planning, Stage


def _run_deploy(config: DeployConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    deploy(config, log=log)


def plan_deploy(spec: dict, ctx: Planning) -> list[Stage]:
    """One deploy entry ({"models": [...ONNX exports], "target", **DeployConfig fields}): one
    bundle per model. The check runs where the target's runtime is on the machine (check "auto")."""
    spec = dict(spec)
    targets = spec.pop("models", None)
    if not targets:
        raise ConfigError("deploy: every entry needs 'models', the ONNX exports to bundle (e.g. teacher-onnx)")
    base = DeployConfig.from_dict(spec, "deploy", model="x", out="x")
    stages = []
    for target in targets:
        src = ctx.model(target, "deploy")
        if src.kind != "export":
            raise ConfigError(f"deploy: {target!r} is not an ONNX export; bundle the exported models "
                              f"({sorted(m for m, s in ctx.models.items() if s.kind == 'export')})")
        config = dataclasses.replace(base, model=str(src.folder), out=str(ctx.out / "deploy" / base.target / target))
        stages.append(ctx.add(Stage(f"deploy/{base.target}/{target}", "deploy", Path(config.out),
                                    config.fingerprint_dict(), [src.name], partial(_run_deploy, config, ctx.log))))
    return stages
