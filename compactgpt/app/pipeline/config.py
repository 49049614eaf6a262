"""The pipeline config: a JSON object with one key per stage group, read and checked before
anything is planned. The shipped configs live in compactgpt/app/pipelines/."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ...errors import ConfigError

STAGE_GROUPS = ("corpus", "teacher", "finetune", "students", "quantize", "export", "deploy", "bench")
BUILT_IN = ("default", "gpu", "gpu-124m")
REQUIRED_GROUPS = ("corpus", "teacher", "bench")


def default_config_path(name: str = "default") -> Path:
    """A config shipped with CompactGPT (default: 2 CPU cores; gpu: a GPT-2-124M teacher on one
    GPU). Raises ConfigError for an unknown name."""
    path = Path(str(resources.files("compactgpt.app") / "pipelines" / f"{name}.json"))
    if not path.is_file():
        raise ConfigError(f"no built-in pipeline config {name!r}; built-in: {', '.join(BUILT_IN)}")
    return path


def _config_path(path: str | Path | None) -> Path:
    """The file a --config value names: a path, or a built-in name (no slash, no .json)."""
    if path is None:
        return default_config_path()
    if not Path(path).is_file() and "/" not in str(path) and not str(path).endswith(".json"):
        return default_config_path(str(path))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config {path} does not exist; pass a JSON file or a built-in name "
                          f"({', '.join(BUILT_IN)})")
    return path


def load_config(path: str | Path | None) -> dict:
    """The pipeline config from a JSON file or a built-in name (None: the default config).
    Raises ConfigError for a missing file, invalid JSON, an unknown stage group or a missing
    required one."""
    path = _config_path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object with keys among {list(STAGE_GROUPS)}")
    unknown = sorted(set(config) - set(STAGE_GROUPS) - {"comment"})
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) {unknown}; the stages are {list(STAGE_GROUPS)}")
    for required in REQUIRED_GROUPS:
        if required not in config:
            raise ConfigError(f"{path}: the '{required}' stage is missing; every pipeline needs corpus, teacher and bench")
    return config
