"""Files written atomically (to a temporary name beside the target, then renamed: a crash
leaves either the old file or the new one, never half of one), and JSON read back with one
typed error for a file that is missing, unreadable or not what it should be."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import ArtifactError, write_fault


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only
    be read by setting it, which would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync it, then rename tmp_path over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp creates the file 0600 (and some writers recreate it so): an artifact is meant
        # to be shared, so it gets the mode open() gives a new file, 0666 less the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        fault = write_fault(e, path.parent)
        if fault is not None and fault.errno is not None:
            # Named after the file being written, not its temporary (nor a writer library's own).
            raise OSError(fault.errno, fault.strerror, str(path)) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str, fix: str, expect: type | tuple[type, ...] = (dict, list)) -> Any:
    """The JSON value stored in path, which should hold `what` (e.g. "a manifest"): a dict or a
    list unless `expect` names other types. Raises ArtifactError in one line naming the file,
    what is wrong with it (missing, unreadable, not valid JSON, another kind of value) and `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: it should hold {what}; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} could not be read ({e}); {fix}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, expect):
        raise ArtifactError(f"{path} holds a JSON {type(value).__name__}, not {what}; {fix}")
    return value
