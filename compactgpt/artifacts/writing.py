"""The write protocol of an artifact folder: an `.incomplete` marker first (the manifest
removed), every file written atomically, the manifest last and the marker removed. A folder
with the marker never loads."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from ..errors import ArtifactError
from ..io import atomic_write_json, sha256_file
from .manifest import INCOMPLETE, MANIFEST, Manifest, library_versions, parent_record, read_manifest, write_manifest


def read_marker(folder: str | Path) -> dict:
    """What the `.incomplete` marker of folder records ({} when there is none or it is not
    JSON): the stage writing it and the files of the artifact it replaces."""
    try:
        d = json.loads((Path(folder) / INCOMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def remove_stray_temporaries(folder: Path) -> None:
    """Delete the temporary files writers killed mid-write left in folder."""
    # atomic_write's temporaries are named .NAME.XXXX.tmp; one survives only when its writer was
    # killed, and the output lock (compactgpt.outputs) guarantees no other writer is running.
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def begin_write(folder: str | Path, stage: str | None = None) -> Path:
    """Mark a folder as being written: loads of it fail until finish_write. The marker records
    the stage and the files of the artifact being replaced, so that finish_write removes those
    the new artifact does not write again (even after an interrupted write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        old = read_manifest(folder) if not (folder / INCOMPLETE).exists() else None
    except ArtifactError:  # a damaged manifest: nothing to clean up after but its own file
        old = None
    previous = set(read_marker(folder).get("previous_files", [])) | set(old.files if old else [])
    marker = {"note": "written by CompactGPT; removed when the write completes", "stage": stage,
              "previous_files": sorted(previous)}
    remove_stray_temporaries(folder)
    atomic_write_json(folder / INCOMPLETE, marker)
    (folder / MANIFEST).unlink(missing_ok=True)
    return folder


def finish_write(
    folder: str | Path,
    stage: str,
    settings: dict,
    *,
    parent: str | Path | None = None,
    metrics: dict | None = None,
    files: list[str],
    extra: dict | None = None,
) -> Manifest:
    """Hash the listed files, write the manifest last, and clear the incomplete marker."""
    folder = Path(folder)
    manifest = Manifest(
        stage=stage,
        settings=settings,
        parent=parent_record(parent, relative_to=folder),
        metrics=metrics or {},
        files={name: sha256_file(folder / name) for name in sorted(files)},
        versions=library_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=extra or {},
    )
    # No file of the replaced artifact survives into the new one, and no temporary file either.
    for name in set(read_marker(folder).get("previous_files", [])) - set(files):
        if "/" not in name and name not in (MANIFEST, INCOMPLETE):
            (folder / name).unlink(missing_ok=True)
    remove_stray_temporaries(folder)
    write_manifest(folder, manifest)
    (folder / INCOMPLETE).unlink(missing_ok=True)
    return manifest


def update_metrics(folder: str | Path, metrics: dict) -> Manifest:
    """Merge metrics into an existing manifest (atomically)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder} has no {MANIFEST}; only CompactGPT artifacts record metrics")
    manifest.metrics.update(metrics)
    write_manifest(folder, manifest)
    return manifest
