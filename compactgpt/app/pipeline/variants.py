"""Planners of the deployable variants: quantized copies of the models named so far
(OUT/quantized/MODEL-NAME) and ONNX exports of any of them (OUT/onnx/MODEL)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable

from export import ExportConfig, export_onnx
from quantize import QuantizeConfig, config_for, quantize_folder

from ...errors import ConfigError
from .stages import Planning, Stage, fingerprint_settings


def _run_quantize(config: QuantizeConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    # quantize_folder loads the artifact back before returning: a stage counts as done only
    # when its artifact loads.
    quantize_folder(config, log=log)


def _run_export(config: ExportConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    export_onnx(config, log=log)


def plan_quantize(spec: dict, ctx: Planning) -> list[Stage]:
    """One quantize entry ({"name", "models", "method", "calib_data"?, **method settings}):
    one stage per model, each artifact named MODEL-NAME."""
    spec = dict(spec)
    qname = spec.pop("name", None)
    targets = spec.pop("models", None)
    method = spec.pop("method", None)
    calib = spec.pop("calib_data", None)
    if not qname or not targets or not method:
        raise ConfigError(f"quantize: every entry needs 'name', 'models' and 'method', got {spec}")
    config = config_for(method, **spec)  # the quantize registry: unknown methods/settings are errors
    stages = []
    for target in targets:
        src = ctx.model(target, f"quantize {qname}", known="known so far")
        name = f"{target}-{qname}"
        run = QuantizeConfig(model=str(src.folder), out=str(ctx.out / "quantized" / name), method=config,
                             data=calib, progress=ctx.progress)
        stages.append(ctx.add(Stage(name, "quantize", Path(run.out), {**config.fingerprint_dict(), "calib_data": calib},
                                    [src.name], partial(_run_quantize, run, ctx.log), model=name)))
    return stages


def plan_exports(settings: dict, ctx: Planning) -> list[Stage]:
    """The export group ({"models": [...], **ExportConfig fields}): one ONNX export per model,
    each with the same settings, named MODEL-onnx."""
    settings = dict(settings)
    targets = settings.pop("models", [])
    base = ExportConfig.from_dict(settings, "export", model="x", out="x")
    stages = []
    for target in targets:
        src = ctx.model(target, "export")
        config = dataclasses.replace(base, model=str(src.folder), out=str(ctx.out / "onnx" / target))
        settings = fingerprint_settings(config, ("threads",))  # saved before it became a run setting
        stages.append(ctx.add(Stage(f"{target}-onnx", "export", Path(config.out), settings, [src.name],
                                    partial(_run_export, config, ctx.log), model=f"{target}-onnx")))
    return stages
