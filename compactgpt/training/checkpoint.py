"""Checkpoints: model, optimizer, schedule position, RNG and sampler state, swapped in whole so a
crash never leaves half of one; resumed only with the settings they were made with."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ..errors import ArtifactError, ConfigError
from ..io import read_json
from ..outputs import CHECKPOINT, CHECKPOINT_COMPLETE, find_checkpoint
from .distributed import scatter_full_state


@dataclass
class LoopState:
    """Where a run stands: what a checkpoint saves besides the weights, optimizer and RNG."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds, validation excluded
    history: list = field(default_factory=list)  # validation results so far
    skipped: int = 0  # steps whose update was dropped for a non-finite loss or gradient norm (nan_skips)


def save_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator,
                    state: LoopState, fingerprint: dict, settings: dict) -> None:
    """Write model (safetensors) and trainer state (tensors and plain values, loadable with
    weights_only=True), then swap the folder in whole so a crash never leaves half of one.

    optimizer: the optimizer, or its full state dict already gathered from FSDP shards
    (gather_full_state): the files are the same either way, so any run can resume them."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_model(model, str(tmp / "model.safetensors"))
    trainer = {
        "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "state": asdict(state),
    }
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    # The stage's settings beside the checkpoint let `--resume` continue from files alone.
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
    (tmp / CHECKPOINT_COMPLETE).write_text("")  # last: a .tmp without it was cut short, and is never resumed
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    # A crash between the two renames leaves the checkpoint as .old or .tmp alone:
    # find_checkpoint finds it there, and resuming moves it back (recover_checkpoint).
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(out: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """find_checkpoint, with a checkpoint left as .tmp or .old by a save cut short renamed back
    to out/checkpoint. Returns out/checkpoint, or None when there is no checkpoint. Main process
    only (it renames folders)."""
    found = find_checkpoint(out)
    folder = Path(out) / CHECKPOINT
    if found is None or found == folder:
        return found
    found.rename(folder)
    log(f"recovered the checkpoint {folder} from {found.name} (its last save was cut short)")
    return folder


def _damaged(path: Path, reason: str) -> ArtifactError:
    return ArtifactError(f"{path} is damaged ({reason}): the checkpoint cannot be resumed; pass --overwrite "
                         "instead of --resume to start over")


def _why(error: Exception) -> str:
    """A short reason for a file that failed to load. torch.load's own messages can advise
    weights_only=False, which would run whatever code a damaged or foreign file holds."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    first = (str(error).strip().splitlines() or [""])[0]
    return type(error).__name__ if not first or "weights_only" in str(error) else first[:160]


def read_checkpoint_fingerprint(folder: Path) -> dict | None:
    """The settings a checkpoint was made with (fingerprint.json); None when it has none."""
    path = folder / "fingerprint.json"
    if not path.is_file():
        return None
    return read_json(path, "a checkpoint's settings (a JSON object)", "the checkpoint is damaged and cannot be "
                     "resumed: pass --overwrite instead of --resume to start over", dict)


def load_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator,
                    sharded: nn.Module | None = None) -> LoopState:
    """Restore a checkpoint into model, optimizer and generator; with FSDP (`sharded`, the copy
    the optimizer trains) the full weights and optimizer state are then split into its shards.
    Raises ArtifactError naming the file when one is missing or damaged."""
    weights_file, trainer_file = folder / "model.safetensors", folder / "trainer.pt"
    try:
        load_safetensors_model(model, str(weights_file))
    except Exception as e:  # safetensors has its own error type for cut or corrupted files
        raise _damaged(weights_file, _why(e)) from None
    if not all(torch.isfinite(w).all() for w in model.state_dict().values() if w.is_floating_point()):
        raise _damaged(weights_file, "non-finite weights")
    try:
        trainer = torch.load(trainer_file, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, foreign pickle, ...: the error types vary
        raise _damaged(trainer_file, _why(e)) from None
    keys = ("optimizer", "generator", "torch_rng", "cuda_rng", "state")
    if not isinstance(trainer, dict) or any(k not in trainer for k in keys):
        raise _damaged(trainer_file, f"not a trainer state: it needs {', '.join(keys)}")
    if sharded is None:
        optimizer.load_state_dict(trainer["optimizer"])
    else:
        scatter_full_state(sharded, optimizer, model.state_dict(), trainer["optimizer"])
    generator.set_state(trainer["generator"])
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return LoopState(**trainer["state"])


def check_resume(folder: Path, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint made with other settings: name each difference."""
    saved = read_checkpoint_fingerprint(folder)
    if saved is None:
        raise ConfigError(f"{folder} has no fingerprint.json; it is not a CompactGPT checkpoint")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"cannot resume {folder}: it was made with different settings ({'; '.join(diffs)}). "
            "Resume with the original settings, or start over in another --out folder (or pass --overwrite)"
        )
