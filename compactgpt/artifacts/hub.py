"""A model named by a local folder or by a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError
from .manifest import WEIGHTS


def resolve_model_path(spec: str | Path, cache_dir: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id (e.g. "gpt2", "distilgpt2"),
    fetched once into the local cache (safetensors and tokenizer files only)."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise ArtifactError(f"{spec} does not exist; pass an existing model folder")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=str(spec),
            allow_patterns=["config.json", WEIGHTS, "tokenizer.json", "vocab.json", "merges.txt",
                            "tokenizer_config.json", "special_tokens_map.json"],
            cache_dir=cache_dir,
        )
    except Exception as e:  # the hub client raises many kinds; all mean "could not fetch"
        raise ArtifactError(
            f"{spec} is neither a local folder nor a model that could be fetched from the hub ({e}); "
            "pass a local GPT-2 folder (config.json + model.safetensors + tokenizer)"
        ) from e
    return Path(local)
