"""`compactgpt pipeline`: corpus -> tokenizer -> teacher (-> finetune) -> students ->
quantized variants -> ONNX exports -> bench -> report, stage by stage, one artifact folder
per stage under OUT.

A pipeline config is JSON with one key per stage group (unknown keys are errors):

    corpus    DataConfig fields (source, vocab_size, val_fraction, ...)
    teacher   TrainConfig fields (preset plus overrides)
    finetune  optional FinetuneConfig fields (task, data, ...), applied to the teacher
    students  [{"name", "prune": PruneConfig fields | null, "distill": DistillConfig fields}]
    quantize  [{"name", "models": [...], "method", **that method's settings}]
    export    {"models": [...], **ExportConfig fields}
    bench     {"models": [...], "baseline": NAME, **BenchConfig fields}

Resumable: every stage gets a fingerprint (its settings, minus the folders, plus its
parents' fingerprints). A stage whose folder holds a finished artifact recorded with the
same fingerprint and unchanged files is skipped; a changed setting changes that stage's
fingerprint and so every stage downstream of it; an interrupted training stage resumes from
its checkpoint when its fingerprint is unchanged and starts over otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import ConfigError

RECORD = "pipeline-stage.json"  # the pipeline's note in each stage folder: fingerprint, state, artifact hash
STAGE_GROUPS = ("corpus", "teacher", "finetune", "students", "quantize", "export", "bench")
# Settings that name folders: they follow from OUT and the parents, so they stay out of the fingerprint.
PATH_FIELDS = {"out", "model", "teacher", "student", "data", "source_folder"}


@dataclass
class Stage:
    """One step of the plan: what runs, where its artifact goes, what it depends on."""

    name: str  # unique, e.g. "teacher", "student-l2/distill", "student-l2-int4", "student-l2-int4-onnx"
    kind: str  # corpus, pretrain, finetune, prune, distill, quantize, export, measure, report
    folder: Path
    settings: dict
    parents: list[str]
    run: Callable[["Stage", bool], None]  # (stage, resume)
    trains: bool = False  # keeps a checkpoint that a rerun with the same fingerprint continues
    fingerprint: str = ""
    model: str | None = None  # the model name this stage's artifact is known by in quantize/export/bench


def fingerprint(kind: str, settings: dict, parent_prints: list[str]) -> str:
    """A stable hash of what a stage computes: kind, settings without folder paths, parents."""
    clean = {k: v for k, v in sorted(settings.items()) if k not in PATH_FIELDS}
    blob = json.dumps({"kind": kind, "settings": clean, "parents": parent_prints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_config_path(name: str = "default") -> Path:
    """A config shipped with CompactGPT (default: 2 CPU cores; gpu: a GPT-2-124M teacher on one GPU)."""
    path = Path(str(resources.files("compactgpt") / "pipelines" / f"{name}.json"))
    if not path.is_file():
        raise ConfigError(f"no built-in pipeline config {name!r}; built-in: default, gpu")
    return path


def load_config(path: str | Path | None) -> dict:
    """The pipeline config from a JSON file (or a built-in name); unknown stage groups are errors."""
    if path is None:
        path = default_config_path()
    elif not Path(path).is_file() and "/" not in str(path) and not str(path).endswith(".json"):
        path = default_config_path(str(path))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config {path} does not exist; pass a JSON file or a built-in name (default, gpu)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object with keys among {list(STAGE_GROUPS)}")
    unknown = sorted(set(config) - set(STAGE_GROUPS) - {"comment"})
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) {unknown}; the stages are {list(STAGE_GROUPS)}")
    for required in ("corpus", "teacher", "bench"):
        if required not in config:
            raise ConfigError(f"{path}: the '{required}' stage is missing; every pipeline needs corpus, teacher and bench")
    return config


def _dataclass_from(cls, values: dict, where: str, **fixed):
    """Build a stage config from a dict; unknown keys are errors naming the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; known: {sorted(known - set(fixed))}")
    return cls(**{**values, **fixed})


# ---------------------------------------------------------------------------------------
# Planning: every config is built and validated here, before any work


def plan(config: dict, out: str | Path, log: Callable[[str], None] = print, progress: bool = True) -> list[Stage]:
    """The ordered stages of a config. Raises ConfigError for an unknown stage, method, model
    name or setting; nothing runs before the whole plan is valid."""
    from distill import DistillConfig, PruneConfig
    from export import ExportConfig, export_onnx
    from quantize import config_for

    from .bench import BenchConfig
    from .data import DataConfig
    from .training import config_from_preset

    out = Path(out).resolve()
    stages: list[Stage] = []
    models: dict[str, Stage] = {}  # model name -> the stage that writes it

    def add(stage: Stage) -> Stage:
        if any(s.name == stage.name for s in stages):
            raise ConfigError(f"two stages are named {stage.name!r}; give every student and variant a distinct name")
        stages.append(stage)
        if stage.model:
            if stage.model in models:
                raise ConfigError(f"two artifacts are named {stage.model!r}; rename one")
            models[stage.model] = stage
        return stage

    # corpus -> tokenizer + shards
    data_cfg = _dataclass_from(DataConfig, config["corpus"], "corpus")
    data_dir = out / "data"

    def run_corpus(st: Stage, resume: bool) -> None:
        from .data import prepare_data

        prepare_data(data_cfg, st.folder, log=log)

    add(Stage("corpus", "corpus", data_dir, data_cfg.to_dict(), [], run_corpus))

    # teacher
    t = dict(config["teacher"])
    preset = t.pop("preset", "small")
    for k in ("data", "out"):
        if k in t:
            raise ConfigError(f"teacher: '{k}' is set by the pipeline (corpus folder, OUT/teacher); remove it")
    train_cfg = config_from_preset(preset, data=str(data_dir), out=str(out / "teacher"), **t)

    def run_teacher(st: Stage, resume: bool) -> None:
        from .training import pretrain

        pretrain(train_cfg, log=log, progress=progress, resume=resume, overwrite=not resume)

    teacher = add(Stage("teacher", "pretrain", out / "teacher", train_cfg.to_dict(), ["corpus"], run_teacher,
                        trains=True, model="teacher"))

    if config.get("finetune"):
        from .finetune import FinetuneConfig

        f = dict(config["finetune"])
        ft_cfg = _dataclass_from(FinetuneConfig, f, "finetune", model=str(teacher.folder), out=str(out / "teacher-ft"))
        ft_cfg.resolve()

        def run_finetune(st: Stage, resume: bool) -> None:
            from .finetune import finetune

            finetune(ft_cfg, log=log, progress=progress, resume=resume, overwrite=not resume)

        models.pop("teacher")
        teacher.model = None
        teacher = add(Stage("teacher-ft", "finetune", out / "teacher-ft", ft_cfg.to_dict(), ["teacher"],
                            run_finetune, trains=True, model="teacher"))

    # students: optional structured pruning, then distillation from the teacher
    for spec in config.get("students") or []:
        spec = dict(spec)
        name = spec.pop("name", None)
        if not name:
            raise ConfigError(f"students: every student needs a 'name', got {spec}")
        prune_settings = spec.pop("prune", None)
        distill_settings = spec.pop("distill", None)
        if spec:
            raise ConfigError(f"student {name}: unknown keys {sorted(spec)}; a student has name, prune, distill")
        if distill_settings is None:
            raise ConfigError(f"student {name}: 'distill' settings are required (use {{}} for the defaults)")
        parent = teacher.name
        student_src: str
        d = dict(distill_settings)
        if prune_settings is not None:
            p_cfg = _dataclass_from(PruneConfig, prune_settings, f"student {name} prune",
                                    model=str(teacher.folder), out=str(out / "students" / name / "pruned"),
                                    data=str(data_dir))
            p_cfg.validate()

            def run_prune(st: Stage, resume: bool, p_cfg=p_cfg) -> None:
                from distill import prune

                prune(p_cfg, log=log, progress=progress)

            add(Stage(f"{name}/prune", "prune", Path(p_cfg.out), p_cfg.to_dict(), [teacher.name], run_prune))
            parent_names = [teacher.name, f"{name}/prune"]
            student_src = p_cfg.out
        else:
            if "student" not in d:
                raise ConfigError(f"student {name}: without 'prune', distill needs 'student' (a shape such as "
                                  "n_layer=2,n_embd=128,n_head=2)")
            student_src = d.pop("student")
            parent_names = [parent]
        d_cfg = _dataclass_from(DistillConfig, d, f"student {name} distill", teacher=str(teacher.folder),
                                student=student_src, out=str(out / "students" / name / "distilled"),
                                data=str(data_dir))
        d_cfg.validate()
        settings = d_cfg.to_dict()
        if prune_settings is None:
            settings["student_shape"] = student_src  # a shape is a setting, not a folder

        def run_distill(st: Stage, resume: bool, d_cfg=d_cfg) -> None:
            from distill import distill

            distill(d_cfg, log=log, progress=progress, resume=resume, overwrite=not resume)

        add(Stage(f"{name}/distill", "distill", Path(d_cfg.out), settings, parent_names, run_distill,
                  trains=True, model=name))

    # quantized variants
    for spec in config.get("quantize") or []:
        spec = dict(spec)
        qname = spec.pop("name", None)
        targets = spec.pop("models", None)
        method = spec.pop("method", None)
        calib = spec.pop("calib_data", None)
        if not qname or not targets or not method:
            raise ConfigError(f"quantize: every entry needs 'name', 'models' and 'method', got {spec}")
        qcfg = config_for(method, **spec)  # the quantize registry: unknown methods/settings are errors
        for target in targets:
            if target not in models:
                raise ConfigError(f"quantize {qname}: unknown model {target!r}; known so far: {sorted(models)}")
            src = models[target]
            folder = out / "quantized" / f"{target}-{qname}"

            def run_quantize(st: Stage, resume: bool, qcfg=qcfg, src=src, calib=calib) -> None:
                _quantize(src.folder, st.folder, qcfg, calib, progress)

            add(Stage(f"{target}-{qname}", "quantize", folder, {**qcfg.to_dict(), "calib_data": calib},
                      [src.name], run_quantize, model=f"{target}-{qname}"))

    # ONNX exports
    exp = dict(config.get("export") or {})
    exp_models = exp.pop("models", [])
    base_export = _dataclass_from(ExportConfig, exp, "export", model="x", out="x")
    for target in exp_models:
        if target not in models:
            raise ConfigError(f"export: unknown model {target!r}; known: {sorted(models)}")
        src = models[target]
        e_cfg = dataclasses.replace(base_export, model=str(src.folder), out=str(out / "onnx" / target))

        def run_export(st: Stage, resume: bool, e_cfg=e_cfg) -> None:
            export_onnx(e_cfg, log=log)

        add(Stage(f"{target}-onnx", "export", Path(e_cfg.out), e_cfg.to_dict(), [src.name], run_export,
                  model=f"{target}-onnx"))

    # bench: one measurement per artifact (cached), then the report
    b = dict(config["bench"])
    bench_models = b.pop("models", None) or [m for m in models if m.endswith("-onnx")]
    baseline = b.pop("baseline", None) or bench_models[0]
    bench_cfg = _dataclass_from(BenchConfig, b, "bench", data=str(data_dir))
    for target in bench_models:
        if target not in models:
            raise ConfigError(f"bench: unknown model {target!r}; known: {sorted(models)}")
    if baseline not in bench_models:
        raise ConfigError(f"bench: baseline {baseline!r} is not among the benchmarked models {bench_models}")
    measured = []
    reference = models[baseline]  # every row's KL divergence is measured against the baseline
    for target in bench_models:
        src = models[target]

        def run_measure(st: Stage, resume: bool, src=src) -> None:
            from .bench import measure

            record = measure(src.folder, bench_cfg, progress=progress, reference=reference.folder)
            st.folder.mkdir(parents=True, exist_ok=True)
            from .io import atomic_write_json

            atomic_write_json(st.folder / "measurement.json", record)

        parents = [src.name] + ([reference.name] if reference.name != src.name else [])
        measured.append(add(Stage(f"bench/{target}", "measure", out / "bench" / target, bench_cfg.to_dict(),
                                  parents, run_measure)))

    def run_report(st: Stage, resume: bool) -> None:
        from .bench_report import build_report, write_report
        from .machine import machine_info

        meas = {m.name.split("/", 1)[1]: json.loads((m.folder / "measurement.json").read_text()) for m in measured}
        folders = {name: str(models[name].folder) for name in meas}
        machine = machine_info()
        machine["torch_threads"] = bench_cfg.threads
        report = build_report(folders, meas, bench_cfg.to_dict(), machine, baseline=baseline,
                              command=" ".join(["compactgpt"] + sys.argv[1:]) if sys.argv[1:2] == ["pipeline"] else None)
        write_report(report, st.folder)

    add(Stage("report", "report", out / "report", {"baseline": baseline, "models": bench_models},
              [m.name for m in measured], run_report))

    by_name = {s.name: s for s in stages}
    for s in stages:
        s.fingerprint = fingerprint(s.kind, s.settings, [by_name[p].fingerprint for p in s.parents])
    return stages


def _quantize(src: Path, out: Path, qcfg, calib: str | None, progress: bool) -> None:
    """Quantize a float artifact through quantize/'s public API and write it atomically."""
    from quantize import load_calibration, load_quantized, quantize_, save_quantized
    from quantize.api import default_calibration_source

    from .artifacts import load_model

    loaded = load_model(src)
    calibration = None
    if qcfg.calibrated:
        source = calib or default_calibration_source(loaded.manifest)
        if source is None:
            raise ConfigError(f"{qcfg.method} needs calibration data and {src} records none; set calib_data")
        seq_len = qcfg.calib_seq_len or loaded.model.config.n_positions
        calibration = load_calibration(source, loaded.tokenizer, qcfg.calib_samples, seq_len, qcfg.seed)
    report = quantize_(loaded.model, qcfg, calibration, progress=progress)
    save_quantized(out, loaded.model, loaded.tokenizer, qcfg, parent=loaded.folder,
                   metrics={"quantize_seconds": round(report.seconds, 3)}, extra={"calibration": report.calibration})
    load_quantized(out)  # it must load before the stage counts as done


# ---------------------------------------------------------------------------------------
# Running


def _record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _artifact_hash(stage: Stage) -> str:
    """What must be unchanged for a finished stage to count: the manifest's file hashes, or
    the report/measurement files for the stages that write no artifact."""
    from .artifacts import folder_hash
    from .io import sha256_file

    if stage.kind == "measure":
        return sha256_file(stage.folder / "measurement.json")
    if stage.kind == "report":
        return sha256_file(stage.folder / "report.json")
    return folder_hash(stage.folder)


def is_done(stage: Stage) -> bool:
    """The stage's folder holds a finished artifact made with this fingerprint, files unchanged."""
    from .errors import ArtifactError

    rec = _record(stage.folder)
    if not rec or rec.get("state") != "done" or rec.get("fingerprint") != stage.fingerprint:
        return False
    try:
        if _artifact_hash(stage) != rec.get("artifact_hash"):
            return False
        if stage.kind not in ("measure", "report"):
            from .artifacts import read_manifest, verify_files

            # The manifest's hashes against the files on disk: an artifact edited by hand reruns.
            verify_files(stage.folder, read_manifest(stage.folder))
        return True
    except (ArtifactError, OSError, AttributeError):
        return False


def run_pipeline(config: dict, out: str | Path, log: Callable[[str], None] = print, progress: bool = True,
                 only_plan: bool = False) -> tuple[list[Stage], dict[str, str]]:
    """Run every stage that is not up to date; returns the plan and each stage's outcome
    ('skipped', 'ran' or 'resumed', with seconds)."""
    from .io import atomic_write_json

    stages = plan(config, out, log=log, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    done = {s.name: is_done(s) for s in stages}
    stale: set[str] = set()
    for s in stages:  # a stage reruns when it or any ancestor is not up to date
        if not done[s.name] or any(p in stale for p in s.parents):
            stale.add(s.name)
    todo = [s for s in stages if s.name in stale]
    log(f"pipeline: {len(stages)} stages, {len(stages) - len(todo)} up to date, {len(todo)} to run")
    if only_plan:
        for s in stages:
            log(f"  {'run ' if s.name in stale else 'skip'}  {s.name:32s} {s.kind:9s} {s.folder}")
        return stages, {s.name: ("to run" if s.name in stale else "skipped") for s in stages}
    total_t = time.perf_counter()
    for i, s in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {s.name} ({s.kind})"
        if s.name not in stale:
            log(f"{head}: up to date, skipped")
            outcome[s.name] = "skipped"
            continue
        rec = _record(s.folder)
        resume = bool(s.trains and rec and rec.get("state") == "running" and rec.get("fingerprint") == s.fingerprint)
        if s.folder.exists() and not resume:
            # Stale or interrupted with other settings: start from an empty folder, so that no
            # file of the old artifact survives into the new one.
            shutil.rmtree(s.folder)
        s.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(s.folder / RECORD, {"stage": s.name, "kind": s.kind, "fingerprint": s.fingerprint,
                                              "state": "running", "settings": s.settings})
        log(f"{head}: {'resuming' if resume else 'running'} -> {s.folder}")
        t = time.perf_counter()
        s.run(s, resume)
        seconds = time.perf_counter() - t
        atomic_write_json(s.folder / RECORD, {"stage": s.name, "kind": s.kind, "fingerprint": s.fingerprint,
                                              "state": "done", "artifact_hash": _artifact_hash(s),
                                              "seconds": round(seconds, 2), "settings": s.settings})
        outcome[s.name] = f"{'resumed' if resume else 'ran'} {seconds:.1f}s"
        log(f"{head}: done in {seconds:.1f}s")
    total = time.perf_counter() - total_t
    write_run_summary(stages, outcome, out, total)
    log(f"pipeline finished in {total:.1f}s; report: {Path(out) / 'report' / 'report.md'}")
    return stages, outcome


def write_run_summary(stages: list[Stage], outcome: dict[str, str], out: str | Path, total_s: float) -> None:
    """OUT/pipeline-run.json and .md: what this run did per stage, and how long each stage
    took when it was last built (from the stage records)."""
    from .io import atomic_write_json, atomic_write_text
    from .machine import describe, machine_info

    rows = []
    for s in stages:
        rec = _record(s.folder) or {}
        rows.append({"stage": s.name, "kind": s.kind, "folder": str(s.folder), "this_run": outcome.get(s.name),
                     "build_seconds": rec.get("seconds"), "fingerprint": s.fingerprint[:12]})
    built = sum(r["build_seconds"] or 0 for r in rows)
    machine = machine_info()
    summary = {"command": " ".join(["compactgpt"] + sys.argv[1:]), "this_run_seconds": round(total_s, 2),
               "build_seconds_total": round(built, 1), "machine": machine, "stages": rows}
    atomic_write_json(Path(out) / "pipeline-run.json", summary)
    lines = ["# Pipeline run", "", f"Command: `{summary['command']}`", "",
             f"Machine: {describe(machine)}", "",
             f"This run: {total_s:.1f} s. Building every stage took {built / 60:.1f} min in all "
             "(each stage's time when it was last built).", "",
             "| stage | kind | this run | build time s |", "|---|---|---|---|"]
    for r in rows:
        b = "–" if r["build_seconds"] is None else f"{r['build_seconds']:.1f}"
        lines.append(f"| {r['stage']} | {r['kind']} | {r['this_run']} | {b} |")
    atomic_write_text(Path(out) / "pipeline-run.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------
# CLI


def register(subparsers, commands: dict) -> None:
    """Add the `pipeline` verb."""
    p = subparsers.add_parser(
        "pipeline", help="run every stage, corpus to benchmark report (resumable)",
        description="Run corpus -> tokenizer -> teacher (-> finetune) -> students -> quantized variants -> "
        "ONNX exports -> bench -> report, one folder per stage under --out. Stages whose artifact "
        "already matches the config are skipped; a changed setting reruns that stage and those after it; "
        "an interrupted training stage resumes from its checkpoint. The whole config is validated "
        "before any work starts.",
    )
    p.add_argument("--config", help="pipeline JSON file, or a built-in name: default (2 CPU cores, < 45 min) "
                   "or gpu (GPT-2-124M-shaped teacher on one GPU); default: default")
    p.add_argument("--out", required=True, help="folder for every stage's artifact and the report")
    p.add_argument("--plan", action="store_true", help="print which stages would run or be skipped, and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars within stages")
    commands["pipeline"] = cmd_pipeline


def cmd_pipeline(args) -> None:
    config = load_config(args.config)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    run_pipeline(config, args.out, log=log, progress=not args.no_progress, only_plan=args.plan)
    if not args.plan:
        print(Path(args.out) / "report" / "report.md")
