"""Typed errors. Each message names the problem and how to fix it; the CLI prints the
message alone (no traceback) and exits with status 2."""

import errno
import os
import re


class CompactGPTError(Exception):
    """Base class of every error CompactGPT raises on bad input."""


class DataError(CompactGPTError):
    """The corpus or data set cannot be used as given."""


class ArtifactError(CompactGPTError):
    """A folder is not a usable artifact: missing, incomplete, damaged or inconsistent."""


class ConfigError(CompactGPTError):
    """Settings that contradict each other or the artifact they are applied to."""


class TrainingDiverged(CompactGPTError):
    """Training met a non-finite loss, gradient norm or weight: it stopped, keeping the last good
    checkpoint, and wrote no model."""


class StoppedBySignal(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM from `kill` or a job scheduler), handled as Ctrl-C is:
    checkpoint, then stop. A KeyboardInterrupt, so that code which cleans up after Ctrl-C cleans
    up after it too; the CLI exits with `exit_code` (128 + the signal's number, as a shell
    reports a process the signal killed)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class WriteError(CompactGPTError):
    """Writing an output failed (a full disk, a quota, permissions, a read-only disk): what was
    finished before is kept, and the same command completes the work once the cause is fixed.
    Raised by compactgpt.outputs for any write fault in a claimed output folder."""

    def __init__(self, path: str, reason: str, kept: str, fix: str, resume: bool = False):
        self.path, self.reason, self.kept, self.fix, self.resume = path, reason, kept, fix, resume
        super().__init__(self.message())

    def message(self, resume_flag: bool = True) -> str:
        """The one-line message; resume_flag=False leaves out `--resume` (for a command that
        resumes on its own, as the pipeline does)."""
        again = "rerun the same command" + (" with --resume" if self.resume and resume_flag else "")
        return f"could not write {self.path}: {self.reason}; {self.kept}; {self.fix}, then {again}"


# Only a write fails with these: a full disk, an exhausted quota, a file past the file system's or
# the process's size limit (ulimit -f), a read-only file system.
_WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# Reads fail with these too (an input this user may not read): a write fault only where the
# file is known to be written.
_ACCESS = {errno.EACCES, errno.EPERM}
_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota (or have it raised)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or use a disk whose file system holds larger files",
    errno.EROFS: "make that file system writable (it is mounted read-only)",
    errno.EACCES: "give this user write permission there",
    errno.EPERM: "give this user write permission there",
}
_UNKNOWN_FIX = "free space on that disk or give this user write permission there"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_AT_PATH = re.compile(r'at path "([^"]+)"')
# torch's zip writer (caffe2/serialize/inline_container.cc): what it says when a write fails,
# and how it reports a file it could not open (for reading or writing: errno and path).
_TORCH_WRITE = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")
_TORCH_OPEN = re.compile(r"open file failed because of errno (\d+).*?file path: (.+)$")


def _library_os_error(exc: BaseException) -> tuple[OSError | None, bool]:
    """The OSError behind a writer library's own error, and whether the library was writing:
    safetensors' SafetensorError ("Error while serializing: ... (os error 28)") and torch's zip
    writer (a RuntimeError from inline_container.cc that keeps no errno: errno None)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if type(exc).__name__ == "SafetensorError" and text.startswith("Error while serializing"):
        code, path = _OS_ERROR.search(text), _AT_PATH.search(text)
        if code is not None:
            number = int(code.group(1))
            return OSError(number, os.strerror(number), path.group(1) if path else None), True
    if isinstance(exc, RuntimeError) and "inline_container.cc" in text:
        opened = _TORCH_OPEN.search(text)
        if opened is not None:  # an open that failed: a write only if its errno or path says so
            number = int(opened.group(1))
            return OSError(number, os.strerror(number), opened.group(2).strip()), False
        if any(sign in text for sign in _TORCH_WRITE):
            detail = text.split("] ", 1)[-1].strip(" .")
            return OSError(None, f"the write failed (torch's file writer: {detail})"), True
    return None, False


def write_fault(exc: BaseException, out: str | os.PathLike | None = None) -> OSError | None:
    """The OSError of a failed write that exc is or wraps, or None when exc is something else.

    A full disk, a quota, a size limit or a read-only file system is always a write fault, and
    so is a failure torch's file writer reports without a cause; a permission error is one
    only when a writer library reports it or the file lies inside `out` (the folder being
    written), since a missing read permission on an input fails the same way and is not one."""
    if not isinstance(exc, Exception):
        return None
    err, writing = (exc, False) if isinstance(exc, OSError) else _library_os_error(exc)
    if err is None:
        return None
    if err.errno in _WRITE_ONLY or (err.errno is None and writing):
        return err
    if err.errno in _ACCESS and (writing or _inside(err.filename, out) or _inside(err.filename2, out)):
        return err
    return None


def _inside(path, folder) -> bool:
    if path is None or folder is None or isinstance(path, int):
        return False
    path, folder = os.path.abspath(os.fsdecode(path)), os.path.abspath(os.fsdecode(folder))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def fault_fix(err: OSError) -> str:
    """What to do about a write fault, by its errno."""
    return _FIXES.get(err.errno, _UNKNOWN_FIX)
