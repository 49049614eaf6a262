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
