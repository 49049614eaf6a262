"""manifest.json: an artifact's record of the stage, settings, parent, library versions, metrics
and file hashes; and the names of the files every artifact folder shares."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..io import atomic_write_json, read_json, sha256_file


MANIFEST = "manifest.json"


INCOMPLETE = ".incomplete"


WEIGHTS = "model.safetensors"


FORMAT = "compactgpt-artifact"


FORMAT_VERSION = 1


_TRACKED_LIBRARIES = ("compactgpt", "torch", "transformers", "tokenizers", "safetensors", "numpy")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes an artifact."""
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES + extra:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class Manifest:
    """CompactGPT's record of an artifact (manifest.json)."""

    stage: str
    settings: dict[str, Any]
    parent: dict[str, str] | None = None  # {"path": ..., "sha256": ...}
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "created": self.created,
            "settings": self.settings,
            "parent": self.parent,
            "metrics": self.metrics,
            "versions": self.versions,
            "files": self.files,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            stage=d["stage"],
            settings=d.get("settings", {}),
            parent=d.get("parent"),
            metrics=d.get("metrics", {}),
            files=d.get("files", {}),
            versions=d.get("versions", {}),
            created=d.get("created", ""),
            extra=d.get("extra", {}),
        )


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, None when it has none; errors on an unfinished or damaged one."""
    folder = Path(folder)
    check_complete(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    d = read_json(path, "a CompactGPT manifest (a JSON object)", f"rerun the stage that wrote {folder}", dict)
    if d.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a CompactGPT manifest (format={d.get('format')!r})")
    manifest = Manifest.from_dict(d)
    # Settings stored relative to the folder (see write_manifest) read as the paths they name now.
    for key in d.get(RELATIVE_PATHS, []):
        if isinstance(manifest.settings.get(key), str):
            manifest.settings[key] = os.path.normpath(os.path.join(os.path.abspath(folder), manifest.settings[key]))
    return manifest


# Manifest key: the settings whose paths the file stores relative to the artifact's folder.
RELATIVE_PATHS = "relative_paths"


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest, every absolute path among its settings (the folders a pipeline or a
    user named) stored relative to the artifact's folder: the file names no directory of the
    machine that wrote it, and the paths still hold when the run folder moves as a whole.
    read_manifest turns them back into paths."""
    d = manifest.to_dict()
    settings, relative = dict(d["settings"]), []
    here = os.path.abspath(folder)
    for key, value in settings.items():
        if isinstance(value, str) and os.path.isabs(value):
            try:
                settings[key] = Path(os.path.relpath(value, here)).as_posix()
            except ValueError:  # another drive (Windows): no relative path exists
                continue
            relative.append(key)
    d["settings"] = settings
    if relative:
        d[RELATIVE_PATHS] = relative
    atomic_write_json(folder / MANIFEST, d)


def check_complete(folder: Path) -> None:
    """ArtifactError unless folder exists and its last write finished."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist or is not a folder; pass the folder a stage wrote")
    if (folder / INCOMPLETE).exists():
        raise ArtifactError(
            f"{folder} was interrupted while being written and is incomplete; "
            "rerun the stage that writes it (its checkpoint, if any, is kept)"
        )


def folder_hash(folder: str | Path) -> str:
    """A content hash of an artifact: over its manifest's file hashes when it has a manifest,
    else over the files that define a GPT-2 folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.files:
        lines = [f"{name}:{digest}" for name, digest in sorted(manifest.files.items())]
    else:
        names = [n for n in ("config.json", WEIGHTS, "tokenizer.json") if (folder / n).is_file()]
        lines = [f"{n}:{sha256_file(folder / n)}" for n in names]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def parent_record(folder: str | Path | None, relative_to: str | Path | None = None) -> dict[str, str] | None:
    """{"path", "sha256"} of the folder an artifact came from. The path is relative to
    `relative_to` (the artifact's own folder) when given, so a run folder moved or copied to
    another machine keeps its lineage; resolved_parent reads both forms."""
    if folder is None:
        return None
    path = Path(folder).resolve()
    if relative_to is not None:
        path = Path(os.path.relpath(path, Path(relative_to).resolve()))
    return {"path": str(path), "sha256": folder_hash(folder)}


def resolved_parent(folder: str | Path, manifest: "Manifest | None") -> Path | None:
    """The parent folder a manifest names, as a path usable from here (a relative record is
    relative to the folder itself)."""
    recorded = (manifest.parent or {}).get("path") if manifest is not None else None
    if not recorded:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else (Path(folder) / path).resolve()
