"""Planner of the bench group: one measurement per benchmarked model (OUT/bench/MODEL,
cached like any stage) and the report built from them (OUT/report)."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from ...errors import ConfigError
from ...io import atomic_write_json
from ..bench import BenchConfig, measure, write_bench_report
from ..report import relative_folders
from .stages import Planning, Stage

MEASUREMENT = "measurement.json"


def _run_measure(config: BenchConfig, source: Path, reference: Path, stage: Stage, resume: bool) -> None:
    record = measure(source, config, reference=reference)
    stage.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage.folder / MEASUREMENT, relative_folders(record, stage.folder))


def _run_report(config: BenchConfig, measured: list[Stage], folders: dict[str, str], stage: Stage,
                resume: bool) -> None:
    measurements = {m.name.split("/", 1)[1]: json.loads((m.folder / MEASUREMENT).read_text()) for m in measured}
    # The command line is worth recording only when the pipeline verb started this run.
    command = " ".join(["compactgpt"] + sys.argv[1:]) if sys.argv[1:2] == ["pipeline"] else ""
    write_bench_report({name: folders[name] for name in measurements}, measurements,
                       config.replace(command=command), stage.folder)


def runtime_version(source: Stage) -> dict:
    """What a GGUF row's measurement depends on beyond its settings: the llama.cpp binding that
    runs it, or its absence, so that installing llama-cpp-python (or another version) measures
    the row again instead of keeping "not measured". Empty for every other row (their
    fingerprints stay as they were)."""
    if source.kind != "export" or source.settings.get("format") != "gguf":
        return {}
    from importlib import metadata

    try:
        return {"llama_cpp_python": metadata.version("llama-cpp-python")}
    except metadata.PackageNotFoundError:
        return {"llama_cpp_python": None}


def plan_bench(settings: dict, ctx: Planning) -> Stage:
    """The bench group ({"models": [...], "baseline": NAME, **BenchConfig fields}; default: every
    ONNX export, the first as baseline): a measurement per model, every row's KL divergence
    against the baseline, then the report. Returns the report stage."""
    settings = dict(settings)
    targets = settings.pop("models", None) or [m for m in ctx.models if m.endswith("-onnx")]
    if not targets:
        raise ConfigError("bench: no models to benchmark; list them in bench.models or export some to ONNX")
    baseline = settings.pop("baseline", None) or targets[0]
    config = BenchConfig.from_dict(settings, "bench", data=str(ctx.data_dir), baseline=baseline,
                                   progress=ctx.progress)
    sources = [ctx.model(target, "bench") for target in targets]
    if baseline not in targets:
        raise ConfigError(f"bench: baseline {baseline!r} is not among the benchmarked models {targets}")
    reference = ctx.models[baseline]
    measured = []
    for target, src in zip(targets, sources):
        parents = [src.name] + ([reference.name] if reference.name != src.name else [])
        settings = {**config.to_dict(), **runtime_version(src)}
        measured.append(ctx.add(Stage(f"bench/{target}", "measure", ctx.out / "bench" / target, settings,
                                      parents, partial(_run_measure, config, src.folder, reference.folder))))
    folders = {target: str(src.folder) for target, src in zip(targets, sources)}
    return ctx.add(Stage("report", "report", ctx.out / "report", {"baseline": baseline, "models": targets},
                         [m.name for m in measured], partial(_run_report, config, measured, folders)))
