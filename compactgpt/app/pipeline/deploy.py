"""Planner of the deploy group: bundles of exports for where users run them (web,
transformers.js, genai, mobile: ONNX exports; llama.cpp: GGUF exports), one stage per target
and model: OUT/deploy/TARGET/MODEL."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from ..deploy import DeployConfig, deploy
from ..deploy.bundle import source_kind
from .stages import Planning, Stage


def _run_deploy(config: DeployConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    deploy(config, log=log)


def plan_deploy(spec: dict, ctx: Planning) -> list[Stage]:
    """One deploy entry ({"models": [...exports], "target", **DeployConfig fields}): one bundle
    per model, each an export of the kind the target takes. The check runs where the target's
    runtime is on the machine (check "auto")."""
    spec = dict(spec)
    targets = spec.pop("models", None)
    if not targets:
        raise ConfigError("deploy: every entry needs 'models', the exports to bundle (e.g. teacher-onnx)")
    base = DeployConfig.from_dict(spec, "deploy", model="x", out="x")
    wanted = source_kind(base.target)
    exports = sorted(m for m, s in ctx.models.items() if s.kind == "export" and s.settings.get("format", "onnx") == wanted)
    stages = []
    for target in targets:
        src = ctx.model(target, "deploy")
        if target not in exports:
            raise ConfigError(f"deploy: {target!r} is not {'an' if wanted == 'onnx' else 'a'} {wanted.upper()} export, which --target {base.target} "
                              f"bundles; choose among {exports}")
        config = dataclasses.replace(base, model=str(src.folder), out=str(ctx.out / "deploy" / base.target / target))
        stages.append(ctx.add(Stage(f"deploy/{base.target}/{target}", "deploy", Path(config.out),
                                    config.fingerprint_dict(), [src.name], partial(_run_deploy, config, ctx.log))))
    return stages
