"""Claiming an output folder before a stage writes it: nothing a stage reads, and no finished
artifact, is ever lost to a later run.

Every stage (training or not) calls `claim_output` before any work. It refuses, with one line
naming the problem and the fix (ConfigError):

- an --out that is one of the stage's inputs or a folder above one (the input is never
  written over, not even with --overwrite);
- an --out that exists but is not a folder, or lies where this user cannot create or write;
- an --out already being written by another run (an advisory lock, OUT/.lock);
- an --out holding another artifact (a manifest, config.json or model.onnx), a training
  checkpoint, or another stage's unfinished write, unless --overwrite (or, for a checkpoint,
  --resume) says to take it over.

The lock is held until the returned `OutputClaim` is released (it is a context manager), and
removed then; a lock left by a process that died is taken over. The lock is fcntl.flock on the
lock file, so the kernel drops it with its process; the JSON in the file names the holder for
the error message only.

Every stage writes inside its claim, so the claim is also where a failed write gets its one
answer: a full disk, a quota, a read-only disk or a missing permission (an OSError, or the
safetensors / torch error wrapping one) leaving the `with` block becomes a WriteError naming
the file, what was kept (the folder stays marked incomplete; a training stage's last
checkpoint) and the fix, which the CLI prints as one line. Read errors pass unchanged.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path
from typing import Iterable

from .artifacts import INCOMPLETE, MANIFEST, read_marker
from .errors import ConfigError, WriteError, fault_fix, write_fault

try:  # flock is POSIX; elsewhere the lock falls back to the holder's pid (see _held_elsewhere)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = ".lock"
# The folder a training stage keeps its checkpoint in (compactgpt.training writes it), the
# marker its save writes last, and the files a whole checkpoint holds.
CHECKPOINT = "checkpoint"
CHECKPOINT_COMPLETE = "complete"
CHECKPOINT_FILES = ("model.safetensors", "trainer.pt", "fingerprint.json", "settings.json")
# Files whose presence makes a folder an artifact (folder_kind reads them).
ARTIFACT_FILES = (MANIFEST, "config.json", "model.onnx")

InputPaths = dict[str, str | Path | Iterable[str | Path] | None]  # flag -> the path(s) it names


def find_checkpoint(out: str | Path) -> Path | None:
    """The folder holding the checkpoint of training output `out`, or None when there is none.

    That is out/checkpoint when it exists. A save cut short between its two renames (see
    save_checkpoint) leaves no out/checkpoint but a complete out/checkpoint.tmp (the newer of
    the two) or out/checkpoint.old: that one is returned, and recover_checkpoint moves it back.
    Looks at file names only (it loads nothing), so it is cheap enough for any check."""
    folder = Path(out) / CHECKPOINT
    if folder.is_dir():
        return folder  # renamed into place whole; damaged files are reported when it is loaded
    tmp, old = folder.with_name(CHECKPOINT + ".tmp"), folder.with_name(CHECKPOINT + ".old")
    if (tmp / CHECKPOINT_COMPLETE).is_file():
        return tmp
    # .old was a whole checkpoint before its rename (also one saved before the marker existed).
    if (old / CHECKPOINT_COMPLETE).is_file() or all((old / name).is_file() for name in CHECKPOINT_FILES):
        return old
    return None


class OutputClaim:
    """A claimed output folder; `release()` (or leaving the `with` block) drops the lock, and
    removes the folder again when the claim created it and the stage wrote nothing. A write
    fault leaving the `with` block is raised as a WriteError (see write_error)."""

    def __init__(self, out: Path, fd: int | None, created: bool, trains: bool = False) -> None:
        self.out, self._fd, self._created, self.trains = out, fd, created, trains

    def release(self) -> None:
        if self._fd is not None:
            # Unlink before unlocking: a waiter that then locks the old file sees it is gone
            # (the inode check in _lock) and retries on a fresh one.
            (self.out / LOCK).unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._created:
            self._created = False
            try:
                self.out.rmdir()  # only succeeds when empty: a failed stage leaves no empty folder behind
            except OSError:
                pass

    def __enter__(self) -> Path:
        return self.out

    def __exit__(self, kind, exc, tb) -> None:
        try:
            error = write_error(exc, self.out, self.trains) if exc is not None else None
        finally:  # what was kept is read before the release, which may remove an empty folder
            self.release()
        if error is not None:
            raise error from exc


def claim_output(out: str | Path, *, stage: str, inputs: InputPaths | None = None, overwrite: bool = False,
                 resume: bool = False, trains: bool = False, lock: bool = True) -> OutputClaim:
    """Check that stage `stage` may write `out` and lock it (see the module docstring).

    inputs: flag -> path (or several paths) the stage reads; paths that do not exist (a hub
    id, @stdlib, a glob) are skipped. overwrite: take over a folder holding another artifact
    or checkpoint. resume / trains: a training stage continuing (or entitled to continue) its
    own checkpoint. lock=False checks without locking (the torchrun ranks other than 0).
    Returns the claim, to be released when the stage ends (also on error): best as a `with`
    block, which raises a write fault leaving it as a WriteError. Raises ConfigError.
    """
    out = Path(out)
    _refuse_inputs(out, inputs or {})
    _refuse_unwritable(out)
    claim = OutputClaim(out, None, False)
    if lock:
        claim = _lock(out, stage)
    claim.trains = trains
    try:
        _refuse_occupied(out, stage, overwrite, resume, trains)
    except BaseException:
        claim.release()
        raise
    return claim


def write_error(exc: BaseException, out: str | Path | None = None, trains: bool = False) -> WriteError | None:
    """exc as a WriteError when it is a write fault (compactgpt.errors.write_fault), else None.

    out: the folder being written, None when unknown (then only a fault no read can cause
    counts, and the message names the file alone). trains: a training stage, whose last
    checkpoint in out survives and is continued with --resume."""
    fault = write_fault(exc, out)
    if fault is None:
        return None
    if fault.filename:
        path = os.fsdecode(fault.filename)
    else:  # the writer did not say which file
        path = f"into {out}" if out is not None else "a file"
    reason = fault.strerror or "the write failed"
    if out is None:
        return WriteError(path, reason, "every finished artifact is kept", fault_fix(fault))
    kept, resume = _what_was_kept(Path(out), trains)
    return WriteError(path, reason, kept, fault_fix(fault), resume)


def _what_was_kept(out: Path, trains: bool) -> tuple[str, bool]:
    """What a write cut short left in out, in words, and whether --resume continues it."""
    if (out / INCOMPLETE).exists():
        kept = f"{out} stays marked incomplete and will not load"
    elif (out / MANIFEST).is_file():
        kept = f"the artifact already in {out} is unchanged"
    else:
        kept = f"{out} holds no finished artifact"
    if not trains:
        return kept, False
    checkpoint = find_checkpoint(out)
    if checkpoint is None:
        return f"{kept}, and no checkpoint had been saved yet", False
    return f"{kept}, and its last checkpoint ({checkpoint}) is kept", True


def _paths(value) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, Path)):
        return [Path(value)]
    return [Path(v) for v in value if v]


def _refuse_inputs(out: Path, inputs: InputPaths) -> None:
    target = out.resolve()
    for flag, value in inputs.items():
        for path in _paths(value):
            if not path.exists():
                continue
            source = path.resolve()
            if source == target:
                raise ConfigError(f"--out must differ from {flag}: {out} is that folder, and a stage never writes "
                                  "over its input (not even with --overwrite); choose a new --out folder")
            if target in source.parents:
                raise ConfigError(f"--out {out} contains {flag} {path}: writing there would mix the new artifact "
                                  "into a folder above its input; choose an --out folder outside it")


def _refuse_unwritable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; choose a folder path (or remove the file)")
    existing = out
    while not existing.exists():  # the nearest folder that exists: the new ones are made in it
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {existing} is a file, not a folder; "
                          "choose a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: this user cannot write in {existing}; choose a writable folder "
                          "or change its permissions")


def _refuse_occupied(out: Path, stage: str, overwrite: bool, resume: bool, trains: bool) -> None:
    if overwrite or not out.is_dir():
        return
    marker = out / INCOMPLETE
    if marker.exists():
        # An interrupted write: the same stage finishes it; another one needs --overwrite.
        other = read_marker(out).get("stage")
        if other and other != stage:
            raise ConfigError(f"--out {out} holds an unfinished {other} write; pass --overwrite to replace it, "
                              "or choose another --out")
        return
    if find_checkpoint(out) is not None:
        if resume:
            return
        fix = "pass --resume to continue it, or --overwrite" if trains else "pass --overwrite"
        raise ConfigError(f"{out} already holds a training checkpoint; {fix} to start over (the checkpoint "
                          "is then replaced), or choose another --out")
    found = [name for name in ARTIFACT_FILES if (out / name).is_file()]
    if found:
        what = _artifact_stage(out) or "model"
        raise ConfigError(f"--out {out} already holds a finished {what} artifact ({found[0]}); pass --overwrite "
                          "to replace it, or choose another --out")


def _artifact_stage(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------
# The lock


def _holder_text(path: Path) -> str:
    """Who holds the lock, from the JSON its holder wrote: 'stage (pid P on H since T)'."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return f"{d.get('stage', '?')} (pid {d.get('pid', '?')} on {d.get('host', '?')} since {d.get('since', '?')})"
    except (OSError, ValueError, AttributeError):
        return "another process (its lock file is being written)"


def _held_elsewhere(path: Path) -> bool:
    """Without flock: the lock is held while its holder, a process on this host, is alive."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if d.get("host") != socket.gethostname() or d.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(d["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False  # the holder is gone: a stale lock, taken over
    return True


def _lock(out: Path, stage: str) -> OutputClaim:
    created = not out.exists()
    path = out / LOCK
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the mode is filtered by the umask
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif _held_elsewhere(path):
                    raise BlockingIOError
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"--out {out} is being written by {_holder_text(path)}; wait for that run to end "
                                  f"or choose another --out (remove {path} only if that process is gone)") from None
            # The holder may have released and unlinked the file between our open and flock:
            # then we hold a lock on a deleted file, and must lock the new one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
    except ConfigError:
        _remove_if_created(out, created)
        raise
    except OSError as e:
        _remove_if_created(out, created)
        raise ConfigError(f"--out {out} cannot be written ({e.strerror or e}); choose a writable folder") from e
    return OutputClaim(out, fd, created)


def _remove_if_created(out: Path, created: bool) -> None:
    if created:
        try:
            out.rmdir()
        except OSError:
            pass
