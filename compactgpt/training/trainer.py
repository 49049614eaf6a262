"""What one run of the loop holds (Trainer), and how a run starts: the model placed (or sharded),
the optimizer and sampler built, a checkpoint restored when resuming."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..errors import TrainingDiverged
from ..outputs import CHECKPOINT, find_checkpoint
from .checkpoint import LoopState, check_resume, load_checkpoint, recover_checkpoint, save_checkpoint
from .distributed import TrainRuntime, gather_full_state, shard_model
from .optimizer import param_groups
from .settings import LoopConfig


@dataclass
class Trainer:
    """What one run of the loop holds: the model as trained (compiled / DDP-wrapped, or a
    sharded FSDP copy of the plain model), the optimizer, the batch sampler's generator and
    the state a checkpoint saves."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    state: LoopState
    rt: TrainRuntime
    ckpt_dir: Path
    fingerprint: dict
    settings: dict
    sharded: nn.Module | None = None  # FSDP: the sharded copy the optimizer trains
    signalled: int = 0  # the signal (SIGTERM, SIGINT) that asked this process to stop; 0: none
    saved_step: int = -1  # the step of the checkpoint on disk (written or resumed by this run); -1: none

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates (under FSDP, the shards)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def pull_weights(self, with_optimizer: bool = False) -> dict | None:
        """FSDP: copy the trained weights from the shards into the plain model on the main
        process; with_optimizer, also return the full optimizer state there. Every process
        must call it. Without FSDP it does nothing: the plain model is the one trained."""
        if self.sharded is None:
            return None
        weights, optim_state = gather_full_state(self.sharded, self.optimizer if with_optimizer else None)
        if self.rt.is_main:
            self.model.load_state_dict(weights)
        return optim_state

    @contextlib.contextmanager
    def model_on_device(self) -> Iterator[nn.Module]:
        """The plain model on the device. Under FSDP it waits on the CPU and visits the device
        only to be evaluated, so a full copy does not sit beside the shards all run long."""
        if self.sharded is not None:
            self.model.to(self.rt.device)
        try:
            yield self.model
        finally:
            if self.sharded is not None:
                self.model.cpu()

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite, on every process (each checks its shard)."""
        bad = torch.tensor(float(sum(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                                     for p in self.params)), device=self.rt.device)
        if self.rt.distributed:
            torch.distributed.all_reduce(bad)
        return bad.item() == 0

    def checkpoint(self) -> None:
        """Write the checkpoint from the main process. Every process must call it: under FSDP
        they all take part in gathering the shards. Raises TrainingDiverged instead when the
        weights are not finite, so the last good checkpoint is never replaced by a broken one."""
        if not self.weights_finite():
            # A step with a finite loss and gradient can still overflow the weights (a huge lr).
            raise TrainingDiverged(diverged_message(self, "the weights are no longer finite"))
        optimizer = self.optimizer if self.sharded is None else self.pull_weights(with_optimizer=True)
        if self.rt.is_main:
            save_checkpoint(self.ckpt_dir, self.model, optimizer, self.generator, self.state,
                            self.fingerprint, self.settings)
        self.saved_step = self.state.step
        if self.rt.distributed:
            torch.distributed.barrier()

    def finish(self) -> None:
        """FSDP: leave the plain model as training without FSDP would: the trained weights, on
        the device (main process; the others keep theirs on the CPU), the shards released."""
        if self.sharded is None:
            return
        self.pull_weights()
        self.train_model = self.sharded = self.optimizer = None  # free the shards before the copy moves in
        if self.rt.is_main:
            self.model.to(self.rt.device)


def start_trainer(model: nn.Module, config: LoopConfig, out: Path, rt: TrainRuntime, fingerprint: dict,
           resume: bool, log: Callable[[str], None]) -> Trainer:
    """Move the model to its device (under FSDP: shard a copy of it), build the optimizer and
    sampler, and restore a checkpoint when resuming (refused when it was made with other settings)."""
    ckpt_dir = out / CHECKPOINT
    fingerprint = {**fingerprint, "loop": {k: v for k, v in asdict(config).items()
                                           if k in ("batch_size", "grad_accum", "seed", "lr", "weight_decay")}}
    fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON values, compared as loaded
    torch.manual_seed(config.seed + rt.rank)
    model.train()
    # FSDP trains a sharded copy: the plain model waits on the CPU for the gathered weights.
    model.to("cpu" if rt.fsdp else rt.device)
    sharded = shard_model(model, rt) if rt.fsdp else None
    trained = model if sharded is None else sharded
    optimizer = torch.optim.AdamW(
        param_groups(trained, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        **({"fused": True} if rt.device.type == "cuda" else {}),
    )
    generator = torch.Generator().manual_seed(config.seed)
    state = LoopState()
    if resume and rt.is_main:
        recover_checkpoint(out, log)
    if resume and rt.distributed:
        torch.distributed.barrier()  # the others look for the checkpoint once it is back in place
    if resume and find_checkpoint(out) is None:
        if rt.is_main:
            log(f"no checkpoint in {ckpt_dir} yet: starting fresh")
        resume = False
    if resume:
        check_resume(ckpt_dir, fingerprint)
        state = load_checkpoint(ckpt_dir, model, optimizer, generator, sharded)
        if rt.is_main:
            log(f"resumed {ckpt_dir} at step {state.step} ({state.tokens:,} tokens)")
        if state.step >= config.max_steps and rt.is_main:
            log(f"the checkpoint is already at step {state.step} >= max_steps={config.max_steps}")
    # FSDP: compiled after sharding, as DDP wraps the compiled model: dynamo leaves FSDP's
    # gather / free hooks out of its graphs and compiles the blocks' math between them.
    train_model: nn.Module = torch.compile(trained) if config.compile else trained
    if rt.distributed and sharded is None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.is_main and config.parallel == "fsdp":
        log(f"FSDP: parameters, gradients and optimizer state sharded over {rt.world_size} processes"
            + (" (bf16 compute, fp32 gradient reduction)" if rt.bf16 else "") if rt.fsdp
            else "--parallel fsdp with one process: training the plain model")
    return Trainer(model, train_model, optimizer, generator, state, rt, ckpt_dir, fingerprint, asdict(config),
                    sharded, saved_step=state.step if resume else -1)


def diverged_message(t: Trainer, what: str) -> str:
    """TrainingDiverged's one line: where, what, the likely cause and the fix."""
    lr, clip = t.optimizer.param_groups[0]["lr"], t.settings["grad_clip"]
    kept = (f"the last good checkpoint (step {t.saved_step}) is kept in {t.ckpt_dir}"
            if t.saved_step >= 0 else "no checkpoint was written")
    fix = "and gradient clipping (--grad-clip 1.0)" if clip == 0 else "or a longer --warmup-steps"
    return (f"training diverged at step {t.state.step}: {what} (lr {lr:.3g} at that step); the learning rate is "
            f"likely too high: start over (--overwrite) with a lower --lr {fix}; {kept}")
