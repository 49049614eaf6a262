"""Benchmarks: side-by-side measurements against baselines, with the machine recorded."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, result: dict, markdown: str) -> None:
    """`out`.json (the numbers) and `out`.md (the table a reader reads) side by side; prints the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
