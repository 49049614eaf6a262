"""Planners of the deployable variants: quantized copies of the models named so far
(OUT/quantized/MODEL-NAME) and exports of any of them: ONNX (OUT/onnx/MODEL, known as
MODEL-onnx) and GGUF for llama.cpp (OUT/gguf/MODEL, known as MODEL-gguf)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable

from export import ExportConfig, export
from quantize import QuantizeConfig, config_for, quantize_folder

from ...errors import ConfigError
from .stages import Planning, Stage, fingerprint_settings


def _run_quantize(config: QuantizeConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    # quantize_folder loads the artifact back before returning: a stage counts as done only
    # when its artifact loads.
    quantize_folder(config, log=log)


def _run_export(config: ExportConfig, log: Callable[[str], None], stage: Stage, resume: bool) -> None:
    export(config, log=log)


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


def plan_exports(group: dict | list, ctx: Planning) -> list[Stage]:
    """The export group: one entry ({"models": [...], **ExportConfig fields}) or a list of them,
    e.g. one per format. Each entry exports every model it names with the same settings, as
    MODEL-onnx (OUT/onnx/MODEL) or, with "format": "gguf", MODEL-gguf (OUT/gguf/MODEL)."""
    stages = []
    for entry in group if isinstance(group, list) else [group]:
        if not isinstance(entry, dict):
            raise ConfigError(f"export: each entry is an object with 'models' and export settings, got {entry!r}")
        settings = dict(entry)
        targets = settings.pop("models", [])
        base = ExportConfig.from_dict(settings, "export", model="x", out="x")
        for target in targets:
            src = ctx.model(target, "export")
            config = dataclasses.replace(base, model=str(src.folder), out=str(ctx.out / base.format / target))
            settings = fingerprint_settings(config, ("threads",))  # saved before it became a run setting
            name = f"{target}-{base.format}"
            stages.append(ctx.add(Stage(name, "export", Path(config.out), settings, [src.name],
                                        partial(_run_export, config, ctx.log), model=name)))
    return stages
