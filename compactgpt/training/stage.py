"""The frame every training stage runs in (training_stage): settings checked, output claimed and
locked, the checkpoint rule applied, the device and process group set up and always left."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .. import outputs
from ..errors import ConfigError
from ..outputs import CHECKPOINT, find_checkpoint
from .distributed import TrainRuntime, cleanup_distributed, setup_runtime
from .settings import LoopConfig


def checkpoint_rule(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a training stage may write into out: a checkpoint already there (also one a
    save cut short left as checkpoint.tmp / .old) is continued (resume), discarded with its
    log (overwrite), or else the stage is refused, so no run silently replaces earlier work."""
    if find_checkpoint(out) is None or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a training checkpoint; pass --resume to continue it, "
            "or --overwrite to start over (the checkpoint is then replaced)"
        )
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "log.jsonl").unlink(missing_ok=True)


@contextlib.contextmanager
def training_stage(config: LoopConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                   inputs: dict[str, str | Path | None] | None = None,
                   stage: str = "train") -> Iterator[TrainRuntime]:
    """The frame every training stage runs in: check the settings, claim and lock the output
    folder (compactgpt.outputs.claim_output: never an input or a folder above one, never another
    artifact unless overwrite), apply the checkpoint rule (checkpoint_rule), set up the
    device and process group, and always release the lock and leave the process group.

        with training_stage(config, config.out, resume=resume, overwrite=overwrite,
                            inputs={"--teacher": config.teacher}, stage="distill") as rt:
            ...
    """
    config.validate()
    out = Path(out)
    # Under torchrun only rank 0 locks (and clears a discarded checkpoint); the rank is read from
    # the environment because the lock must be taken before the process group is joined.
    main = int(os.environ.get("RANK", "0")) == 0
    claim = outputs.claim_output(out, stage=stage, inputs=inputs, overwrite=overwrite, resume=resume,
                                 trains=True, lock=main)
    with claim:  # released on the way out; a write fault leaving it becomes a WriteError
        if main:
            checkpoint_rule(out, resume, overwrite)
        rt = setup_runtime(config)
        try:
            yield rt
            if rt.distributed:
                torch.distributed.barrier()
        finally:
            cleanup_distributed()
