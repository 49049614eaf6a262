"""Running a plan: skip the stages that are up to date, rerun the rest (and everything
after them) from an empty folder, resume interrupted training, and write a summary."""

from __future__ import annotations

import os

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from ...io import atomic_write_json, atomic_write_text
from ...machine import describe, machine_info
from .plan import plan
from .stages import RECORD, Stage, artifact_hash, is_done, read_record


def stale_stages(stages: list[Stage]) -> set[str]:
    """Names of the stages that must run: not up to date themselves, or after one that is not."""
    stale: set[str] = set()
    for s in stages:  # parents come before their children in a plan
        if not is_done(s) or any(p in stale for p in s.parents):
            stale.add(s.name)
    return stale


def _write_record(stage: Stage, state: str, **extra) -> None:
    atomic_write_json(stage.folder / RECORD, {"stage": stage.name, "kind": stage.kind,
                                              "fingerprint": stage.fingerprint, "state": state, **extra,
                                              "settings": stage.settings})


def resumes(stage: Stage) -> bool:
    """True when the stage trains and was interrupted with this fingerprint: it continues
    from its checkpoint instead of starting over."""
    rec = read_record(stage.folder)
    return bool(stage.trains and rec and rec.get("state") == "running" and rec.get("fingerprint") == stage.fingerprint)


def run_stage(stage: Stage, resume: bool) -> float:
    """Run one stage that is not up to date, recording its state before and after; returns
    the seconds it took."""
    if stage.folder.exists() and not resume:
        # Stale or interrupted with other settings: start from an empty folder, so that no
        # file of the old artifact survives into the new one.
        shutil.rmtree(stage.folder)
    stage.folder.mkdir(parents=True, exist_ok=True)
    _write_record(stage, "running")
    t = time.perf_counter()
    stage.run(stage, resume)
    seconds = time.perf_counter() - t
    _write_record(stage, "done", artifact_hash=artifact_hash(stage), seconds=round(seconds, 2))
    return seconds


def run_pipeline(config: dict, out: str | Path, log: Callable[[str], None] = print, progress: bool = True,
                 only_plan: bool = False) -> tuple[list[Stage], dict[str, str]]:
    """Run every stage that is not up to date; returns the plan and each stage's outcome
    ('skipped', 'ran' or 'resumed', with seconds; with only_plan, 'to run' or 'skipped' and
    nothing runs). Raises ConfigError for a bad config before any work."""
    stages = plan(config, out, log=log, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    stale = stale_stages(stages)
    log(f"pipeline: {len(stages)} stages, {len(stages) - len(stale)} up to date, {len(stale)} to run")
    if only_plan:
        for s in stages:
            log(f"  {'run ' if s.name in stale else 'skip'}  {s.name:32s} {s.kind:9s} {s.folder}")
        return stages, {s.name: ("to run" if s.name in stale else "skipped") for s in stages}
    outcome: dict[str, str] = {}
    total_t = time.perf_counter()
    for i, s in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {s.name} ({s.kind})"
        if s.name not in stale:
            log(f"{head}: up to date, skipped")
            outcome[s.name] = "skipped"
            continue
        resume = resumes(s)
        log(f"{head}: {'resuming' if resume else 'running'} -> {s.folder}")
        seconds = run_stage(s, resume)
        outcome[s.name] = f"{'resumed' if resume else 'ran'} {seconds:.1f}s"
        log(f"{head}: done in {seconds:.1f}s")
    total = time.perf_counter() - total_t
    write_run_summary(stages, outcome, out, total)
    log(f"pipeline finished in {total:.1f}s; report: {Path(out) / 'report' / 'report.md'}")
    return stages, outcome


def write_run_summary(stages: list[Stage], outcome: dict[str, str], out: str | Path, total_s: float) -> None:
    """OUT/pipeline-run.json and .md: what this run did per stage, and how long each stage
    took when it was last built (from the stage records)."""
    rows = []
    for s in stages:
        rec = read_record(s.folder) or {}
        rows.append({"stage": s.name, "kind": s.kind, "folder": os.path.relpath(s.folder, Path(out).resolve()),
                     "this_run": outcome.get(s.name),
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
