"""Placing files into a bundle: hard links where the file system allows (bundles of a large
export then cost no space), copies elsewhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def place(src: Path, dst: Path, *, link: bool = True) -> None:
    """Put src's content at dst (replacing dst). A hard link shares the inode, so a write through
    either name would change both: link only files nobody edits in place (a finished export's,
    the npm cache's), and copy the page's sources (link=False), which users adapt."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def tree_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names)
