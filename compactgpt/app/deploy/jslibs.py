"""The JavaScript libraries the web and transformers.js bundles are built and checked with.

They come from npm at build time, pinned by `js/package.json` and `js/package-lock.json`, and
are installed once per lockfile into a cache folder (COMPACTGPT_JS_DIR, else
$XDG_CACHE_HOME/compactgpt/js or ~/.cache/compactgpt/js), so a bundle never loads anything from
a CDN and two bundles built from one lockfile ship the same bytes. The install is atomic: npm
runs in a temporary folder renamed into place when it succeeds.

`python -m compactgpt.app.deploy.jslibs` installs them ahead of time (the browser tests install
nothing and skip when they are absent).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .config import DeployError

JS_SPEC = Path(__file__).parent / "js"
SPEC_FILES = ("package.json", "package-lock.json")


def cache_root() -> Path:
    if os.environ.get("COMPACTGPT_JS_DIR"):
        return Path(os.environ["COMPACTGPT_JS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compactgpt" / "js"


def lock_digest() -> str:
    h = hashlib.sha256()
    for name in SPEC_FILES:
        h.update((JS_SPEC / name).read_bytes())
    return h.hexdigest()[:16]


def installed_dir() -> Path:
    """Where this lockfile's node_modules live (whether or not they are installed yet)."""
    return cache_root() / lock_digest()


def node_modules() -> Path | None:
    """The installed node_modules of this lockfile, or None when they are not installed."""
    folder = installed_dir() / "node_modules"
    return folder if (installed_dir() / ".complete").is_file() else None


def find_node() -> str | None:
    return shutil.which("node")


def require_node() -> str:
    node = find_node()
    if node is None:
        raise DeployError("node is not installed; the web and transformers.js bundles need Node.js 18 or newer "
                          "(Debian: apt-get install nodejs npm)")
    return node


def ensure_installed(log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """node_modules of this lockfile, installed with `npm ci` on first use. Raises DeployError
    when npm is missing or the install fails (the message carries npm's last lines)."""
    found = node_modules()
    if found is not None:
        return found
    require_node()
    npm = shutil.which("npm")
    if npm is None:
        raise DeployError("npm is not installed; it fetches onnxruntime-web and transformers.js once "
                          "(Debian: apt-get install nodejs npm), then the bundles build offline")
    target = installed_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"installing the JavaScript libraries of {JS_SPEC / 'package.json'} into {target} (once)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".install-") as tmp:
        for name in SPEC_FILES:
            shutil.copyfile(JS_SPEC / name, Path(tmp) / name)
        # --ignore-scripts: onnxruntime-node's install script fetches optional GPU binaries from
        # outside npm; its CPU binaries are in the package itself, which is all Node needs here.
        result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=tmp,
                                capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DeployError(f"npm ci failed in {tmp}: {' / '.join(tail)}; check the network to the npm "
                              "registry, or set COMPACTGPT_JS_DIR to a folder with the libraries installed")
        (Path(tmp) / ".complete").write_text(lock_digest() + "\n")
        if target.exists():  # a concurrent install finished first: keep it
            return target / "node_modules"
        os.rename(tmp, target)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it created
    return target / "node_modules"


def package_version(modules: Path, package: str) -> str:
    import json

    return json.loads((modules / package / "package.json").read_text())["version"]


if __name__ == "__main__":
    print(ensure_installed())
