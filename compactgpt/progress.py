"""Progress bars on a terminal only.

A bar redraws itself with carriage returns; written to a log file, every redraw becomes a
new line and the log drowns in them. So bars appear only when stderr is a terminal (or when
COMPACTGPT_PROGRESS=1 asks for them anyway; COMPACTGPT_PROGRESS=0 turns them off), and long
jobs report plain lines to their log instead (see compactgpt.training).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable


def progress_wanted(requested: bool = True) -> bool:
    """True when a bar should be drawn: requested, and stderr is a terminal (or forced)."""
    if not requested:
        return False
    forced = os.environ.get("COMPACTGPT_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", unit: str = "it", total: int | None = None,
                 initial: int = 0, leave: bool = False, enabled: bool = True):
    """A tqdm bar, or, off a terminal, a tqdm that draws nothing (iterating, update and
    set_postfix still work, so callers need no second code path)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=leave,
                dynamic_ncols=True, disable=not progress_wanted(enabled))
