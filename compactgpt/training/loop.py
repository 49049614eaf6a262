"""run_loop: the training loop every stage that trains runs."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch.nn as nn

from ..errors import StoppedBySignal, TrainingDiverged
from .batches import BatchSource, LossFn, lm_loss
from .checkpoint import LoopState
from .distributed import TrainRuntime, setup_runtime
from .runlog import RunLog
from .settings import LoopConfig
from .step import StepResult, optimizer_step
from .throughput import gpu_peak_flops
from .trainer import Trainer, diverged_message, start_trainer


@dataclass
class LoopResult:
    """The trained model, the loop's final state, and the run's metrics."""

    model: nn.Module
    state: LoopState
    metrics: dict


@contextlib.contextmanager
def sigterm_stops(t: Trainer) -> Iterator[None]:
    """While the loop runs, SIGTERM (sent by `kill` and by job schedulers before they kill) and
    Ctrl-C (SIGINT) ask it to stop after the current step: the handler only notes the signal,
    and the loop then checkpoints and stops at a step boundary that every process agrees on,
    so an interrupt never lands between an optimizer update and the step count (which would
    make the resumed run repeat a step). A second Ctrl-C stops at once, as Ctrl-C always did.
    Python lets only the main thread set handlers; the previous ones are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        if signum == signal.SIGINT and t.signalled == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the step to end
        t.signalled = signum

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def skip_or_diverge(t: Trainer, config: LoopConfig, step: StepResult, run_log: RunLog) -> None:
    """A step whose update was dropped for a non-finite loss or gradient norm: logged and
    skipped while config.nan_skips allows, else TrainingDiverged (no checkpoint is written)."""
    t.state.skipped += 1
    what = f"loss {step.loss:.4g}, gradient norm {step.grad_norm:.4g}"
    if t.state.skipped > config.nan_skips:
        after = f" (after {config.nan_skips} skipped non-finite steps)" if config.nan_skips else ""
        raise TrainingDiverged(diverged_message(t, f"{what}{after}"))
    # Strings: JSON has no nan or inf.
    run_log.write({"event": "skip", "step": t.state.step, "loss": str(step.loss), "grad_norm": str(step.grad_norm)})
    if t.rt.is_main:
        run_log.log(f"step {t.state.step}: {what}: update skipped "
                    f"({t.state.skipped} of --nan-skips {config.nan_skips})")


def run_loop(
    model: nn.Module,
    config: LoopConfig,
    out: str | Path,
    batches: BatchSource,
    loss_fn: LossFn = lm_loss,
    evaluate: Callable[[nn.Module], dict] | None = None,
    *,
    runtime: TrainRuntime | None = None,
    fingerprint: dict | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> LoopResult:
    """Train `model` for config.max_steps optimizer steps.

    evaluate(model) -> dict of metrics runs every eval_interval steps and at the end.
    fingerprint: the settings a checkpoint must share to be resumed (model shape, data, ...).
    on_step(step) is called after each optimizer step (tests use it to interrupt a run).
    On KeyboardInterrupt a checkpoint is written before the interrupt is passed on. SIGTERM
    stops the run after the current step the same way, raising StoppedBySignal (a
    KeyboardInterrupt). A step with a non-finite loss or gradient norm is not applied; past
    config.nan_skips such steps, TrainingDiverged is raised and the last checkpoint is kept.

    With config.parallel "fsdp" under torchrun, a sharded copy of `model` is trained and
    `model` itself stays plain: evaluate() and the checkpoints get it with the weights
    gathered from the shards, and at the end the main process's `model` holds the trained
    weights on the device (the other processes' copies are stale: stages save from rank 0).
    """
    config.validate()
    out = Path(out)
    rt = runtime or setup_runtime(config)
    t = start_trainer(model, config, out, rt, fingerprint or {}, resume, log)
    run_log = RunLog(out / "log.jsonl", rt, progress, config.max_steps, t.state.step, desc, log)
    with sigterm_stops(t):  # also over the checkpoint written on the way out
        try:
            _train(t, config, batches, loss_fn, evaluate, run_log, flops_per_token, on_step)
        except KeyboardInterrupt as stop:
            _save_on_interrupt(t, stop, log)
            raise
        finally:
            run_log.close()
    t.finish()
    return LoopResult(model, t.state, _final_metrics(t.state))


class _TokenRate:
    """Tokens per second over the steps since the last log line, validation time left out."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def take(self) -> float:
        """The rate since the last take, and a new window from now."""
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.tokens, self.start = 0, time.perf_counter()
        return rate

    def restart(self) -> None:
        """Start the window's clock again (after a validation), keeping its tokens."""
        self.start = time.perf_counter()


def _train(t: Trainer, config: LoopConfig, batches: BatchSource, loss_fn: LossFn,
           evaluate: Callable[[nn.Module], dict] | None, run_log: RunLog, flops: float | None,
           on_step: Callable[[int], None] | None) -> None:
    """Optimizer steps from the trainer's step up to config.max_steps, with their log lines,
    validations and checkpoints; StoppedBySignal after the step a signal arrived in."""
    state, rt = t.state, t.rt
    peak = gpu_peak_flops(rt.device)
    rate = _TokenRate()
    while state.step < config.max_steps:
        t0 = time.perf_counter()
        step = optimizer_step(t, config, batches, loss_fn)
        state.step += 1
        state.tokens += step.tokens
        state.elapsed += time.perf_counter() - t0
        rate.tokens += step.tokens
        if not step.finite:
            skip_or_diverge(t, config, step, run_log)
        if on_step is not None:
            on_step(state.step)
        at_end = state.step == config.max_steps
        if (state.step % config.log_interval == 0 or at_end) and step.finite:
            run_log.train(state, step, rate.take(), flops, peak, rt.world_size)
        run_log.advance()
        if (state.step % config.eval_interval == 0 or at_end) and evaluate is not None:
            _validate(t, evaluate, run_log)
            rate.restart()  # keep validation out of tokens/s
        if state.step % config.checkpoint_interval == 0 or at_end:
            t.checkpoint()
        if step.stop:
            signum = t.signalled or signal.SIGTERM  # the signal may have reached another process only
            raise StoppedBySignal(f"stopped by {signal.Signals(signum).name} at step {state.step}", signum)


def _validate(t: Trainer, evaluate: Callable[[nn.Module], dict], run_log: RunLog) -> None:
    """Run evaluate on the plain model (main process) and record its metrics in the history
    and the log."""
    t.pull_weights()  # FSDP: every process takes part in gathering the weights evaluated
    if not t.rt.is_main:
        return
    with t.model_on_device() as model:
        result = evaluate(model)
    record = {"step": t.state.step, "tokens": t.state.tokens, **result}
    t.state.history.append(record)
    run_log.write({"event": "eval", **record})
    run_log.report(t.state.step, {k: f"{v:.3f}" for k, v in result.items() if isinstance(v, float)})


def _save_on_interrupt(t: Trainer, stop: KeyboardInterrupt, log: Callable[[str], None]) -> None:
    """The checkpoint of an interrupted run (unless the step is already saved), and how to go on."""
    # Every interrupted process takes part (FSDP gathers the shards; DDP meets at the
    # barrier); the main one writes the files.
    if t.saved_step != t.state.step:
        t.checkpoint()
    if t.rt.is_main:
        how = str(stop) if isinstance(stop, StoppedBySignal) else f"interrupted at step {t.state.step}"
        log(f"\n{how}; checkpoint saved in {t.ckpt_dir}: rerun with --resume to continue")


def _final_metrics(state: LoopState) -> dict:
    """The run's totals, and the last validation's metrics."""
    metrics = {"steps": state.step, "train_tokens": state.tokens, "train_seconds": round(state.elapsed, 2),
               "tokens_per_s": state.tokens / max(state.elapsed, 1e-9)}
    if state.history:
        metrics.update({k: v for k, v in state.history[-1].items() if k not in ("step", "tokens")})
    return metrics
