"""One optimizer step over grad_accum micro-steps, agreed on by every process."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .batches import BatchSource, LossFn
from .optimizer import clipped_grad_norm, lr_at
from .settings import LoopConfig
from .trainer import Trainer


@dataclass
class StepResult:
    """What one optimizer step did, agreed on by every process."""

    loss: float  # mean over the global batch
    tokens: int
    grad_norm: float  # global, before clipping
    lr: float
    finite: bool  # loss and gradient norm finite on every process: the update was applied
    stop: bool  # some process got SIGTERM: every process stops after this step


def optimizer_step(t: Trainer, config: LoopConfig, batches: BatchSource, loss_fn: LossFn) -> StepResult:
    """One optimizer step over grad_accum micro-steps. A step whose loss or gradient norm is
    not finite on any process is not applied (the weights stay as they were) on every process."""
    rt = t.rt
    lr = lr_at(t.state.step, config)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    step_loss, step_tokens = 0.0, 0
    for micro in range(config.grad_accum):
        # Every rank draws the same world-sized stream and keeps its own share, so the
        # sampler state is identical on all ranks and one checkpoint restores them all.
        for r in range(rt.world_size):
            batch = batches.next_batch(t.generator)
            if r == rt.rank:
                mine = batch
        batch = tuple(x.to(rt.device, non_blocking=True) for x in mine)
        last = micro == config.grad_accum - 1
        # DDP skips the all-reduce on all but the last micro-step. FSDP reduce-scatters on every
        # one: its gradients live sharded, and unsynced ones would be held at full size.
        sync = contextlib.nullcontext() if (last or not rt.distributed or rt.fsdp) else t.train_model.no_sync()
        with sync, rt.autocast():
            loss, n_tokens = loss_fn(t.train_model, batch)
        (loss / config.grad_accum).backward()
        step_loss += loss.item() / config.grad_accum
        step_tokens += n_tokens * rt.world_size
    grad_norm = clipped_grad_norm(t.params, config.grad_clip)
    finite, stop = math.isfinite(step_loss) and math.isfinite(grad_norm), t.signalled != 0
    if rt.distributed:
        # One all-reduce (a sum: gloo has no average) gives the loss of the whole global batch,
        # not the main process's share of it, and whether any process saw a non-finite value
        # or got SIGTERM: all then skip, diverge or stop at the same step, none left waiting.
        total = torch.tensor([step_loss, not finite, stop], dtype=torch.float64, device=rt.device)
        torch.distributed.all_reduce(total)
        step_loss = total[0].item() / rt.world_size
        finite, stop = total[1].item() == 0 and math.isfinite(step_loss), total[2].item() > 0
    if finite:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, step_tokens, grad_norm, lr, finite, stop)
