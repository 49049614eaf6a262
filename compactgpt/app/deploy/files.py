"""Placing files into a bundle: hard links where the file system allows (bundles of a large
export then cost no space), copies elsewhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def place(src: Path, dst: Path) -> None:
    """Put src's content at dst (replacing dst). A hard link shares the inode, so a later write
    through either name would change both; CompactGPT never writes into a finished artifact."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def tree_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names)
