"""A pipeline stage, its fingerprint and its record, and the planning context the stage
groups' planners add their stages to.

A stage is up to date when its folder's record (RECORD) says it finished with the same
fingerprint and its files are unchanged since; the fingerprint hashes what the stage
computes (kind, settings without folders, parents' fingerprints), so a changed setting
reruns that stage and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...artifacts import folder_hash, read_manifest, verify_files
from ...config import StageConfig
from ...errors import ArtifactError, ConfigError
from ...io import sha256_file

RECORD = "pipeline-stage.json"  # the pipeline's note in each stage folder: fingerprint, state, artifact hash
# Settings that name folders: they follow from OUT and the parents, so they stay out of the fingerprint.
PATH_FIELDS = {"out", "model", "teacher", "student", "data", "source_folder"}
# Stages that write a result file rather than an artifact folder with a manifest.
RESULT_FILES = {"measure": "measurement.json", "report": "report.json"}


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


def fingerprint_settings(config: StageConfig, formerly_saved: tuple[str, ...] = ()) -> dict:
    """The settings a stage's fingerprint hashes: config.fingerprint_dict(), with the run
    settings named in `formerly_saved` put back. Those were saved settings when earlier run
    folders were fingerprinted; keeping them keeps those folders up to date."""
    return {**config.fingerprint_dict(), **{name: getattr(config, name) for name in formerly_saved}}


def fingerprint(kind: str, settings: dict, parent_prints: list[str]) -> str:
    """A stable hash of what a stage computes: kind, settings without folder paths, parents."""
    clean = {k: v for k, v in sorted(settings.items()) if k not in PATH_FIELDS}
    blob = json.dumps({"kind": kind, "settings": clean, "parents": parent_prints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Planning:
    """What the planners share: where the run goes, how it logs, the stages planned so far and
    the artifacts they make, by the model name later groups refer to them by."""

    out: Path
    log: Callable[[str], None] = print
    progress: bool = True
    stages: list[Stage] = field(default_factory=list)
    models: dict[str, Stage] = field(default_factory=dict)  # model name -> the stage that writes it
    teacher: Stage | None = None  # the stage students start from: the teacher, or its finetuned copy

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def add(self, stage: Stage) -> Stage:
        """Append a stage; ConfigError when its name or model name is taken."""
        if any(s.name == stage.name for s in self.stages):
            raise ConfigError(f"two stages are named {stage.name!r}; give every student and variant a distinct name")
        self.stages.append(stage)
        if stage.model:
            if stage.model in self.models:
                raise ConfigError(f"two artifacts are named {stage.model!r}; rename one")
            self.models[stage.model] = stage
        return stage

    def model(self, name: str, where: str, known: str = "known") -> Stage:
        """The stage that writes model `name`; ConfigError naming `where` and the known models."""
        if name not in self.models:
            raise ConfigError(f"{where}: unknown model {name!r}; {known}: {sorted(self.models)}")
        return self.models[name]

    def seal(self) -> list[Stage]:
        """The stages with their fingerprints, in plan order (parents always come first)."""
        by_name = {s.name: s for s in self.stages}
        for s in self.stages:
            s.fingerprint = fingerprint(s.kind, s.settings, [by_name[p].fingerprint for p in s.parents])
        return self.stages


# ---------------------------------------------------------------------------------------
# Records: is a stage's folder up to date?


def read_record(folder: Path) -> dict | None:
    """The pipeline's record in a stage folder, or None when there is none (or it is damaged)."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def artifact_hash(stage: Stage) -> str:
    """What must be unchanged for a finished stage to count: the manifest's file hashes, or
    the report/measurement files for the stages that write no artifact."""
    if stage.kind in RESULT_FILES:
        return sha256_file(stage.folder / RESULT_FILES[stage.kind])
    return folder_hash(stage.folder)


def is_done(stage: Stage) -> bool:
    """The stage's folder holds a finished artifact made with this fingerprint, files unchanged."""
    rec = read_record(stage.folder)
    if not rec or rec.get("state") != "done" or rec.get("fingerprint") != stage.fingerprint:
        return False
    try:
        if artifact_hash(stage) != rec.get("artifact_hash"):
            return False
        if stage.kind not in RESULT_FILES:
            # The manifest's hashes against the files on disk: an artifact edited by hand reruns.
            verify_files(stage.folder, read_manifest(stage.folder))
        return True
    except (ArtifactError, OSError, AttributeError):
        return False
