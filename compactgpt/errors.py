"""Typed errors. Each message names the problem and how to fix it; the CLI prints the
message alone (no traceback) and exits with status 2."""


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
