"""What kind of folder a path is, read from its own files.

The core knows only the kinds it writes itself (a float model here, a data folder in
compactgpt.data); every stage registers the kind of folder it writes in its own package
(`register_folder_kind`), so a new stage adds its kind without a change here. folder_kind
answers from the kinds registered so far: code that must tell every kind apart (the
application) imports the stage packages first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError
from .hf_config import config_json
from .manifest import Manifest, check_complete, read_manifest


class FolderFiles:
    """What a kind's test reads of a folder: its path, its manifest and its config.json (each
    read once, config.json only when a test asks for it)."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: Manifest | None = read_manifest(path)

    @functools.cached_property
    def config(self) -> dict:
        """config.json as a dict; {} when the folder has none."""
        return config_json(self.path)

    @property
    def stage(self) -> str | None:
        """The stage the manifest names; None without a manifest."""
        return self.manifest.stage if self.manifest is not None else None


@dataclass(frozen=True)
class FolderKind:
    """One registered kind of folder (see register_folder_kind)."""

    name: str
    description: str
    test: Callable[[FolderFiles], bool]
    rank: int
    marker: str


# name -> what that kind of folder holds, for every kind registered so far.
FOLDER_KINDS: dict[str, str] = {}
_KINDS: dict[str, FolderKind] = {}


def register_folder_kind(name: str, description: str, test: Callable[[FolderFiles], bool], rank: int,
                         marker: str) -> None:
    """Make folder_kind answer `name` for a folder whose files pass `test`; `marker` names what
    the test looks for (a file, a manifest), for the error about a folder of no kind.

    Kinds are tried from the highest rank down, and a stage ranks its kind by its place in the
    pipeline (the core's model is 1, its data folder 0): a folder written by a later stage may
    also hold an earlier stage's files (a bundle holds an ONNX graph, a quantized model a GPT-2
    config.json), and is named by the last stage that wrote it. Registering the same name
    again replaces the earlier entry (a module reloaded)."""
    _KINDS[name] = FolderKind(name, description, test, rank, marker)
    FOLDER_KINDS[name] = description


def folder_kind(folder: str | Path) -> str:
    """What a folder holds (a key of FOLDER_KINDS), from its own files. Raises ArtifactError for
    a missing or unfinished folder, or one that no registered kind recognizes."""
    folder = Path(folder)
    check_complete(folder)
    files = FolderFiles(folder)
    for kind in sorted(_KINDS.values(), key=lambda k: -k.rank):
        if kind.test(files):
            return kind.name
    raise ArtifactError(
        f"{folder} is not an artifact: it has no {', '.join(sorted({k.marker for k in _KINDS.values()}))}; "
        "pass a folder written by a compactgpt verb or by transformers' save_pretrained"
    )


# The core's own kind: any GPT-2 config.json the kinds of later stages did not claim first.
register_folder_kind("model", "a float GPT-2 language model", lambda files: bool(files.config), rank=1,
                     marker="config.json")
