"""Running a page's JavaScript module under Node from a test: a runner script imports the module
by URL, reads the test's input from a JSON file and prints its answer as JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def run_module(tmp_path: Path, runner: str, module: Path, payload) -> object:
    """Run `runner` (an ES module script with one %s where the module's URL goes) under node with
    `payload` written to a JSON file named by its first argument; returns its stdout as JSON."""
    script = tmp_path / f"run_{module.stem}.mjs"
    script.write_text(runner % json.dumps(module.as_uri()))
    data = tmp_path / f"{module.stem}_input.json"
    data.write_text(json.dumps(payload))
    proc = subprocess.run(["node", str(script), str(data)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
