"""The run's JSONL metrics log and its progress on screen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..io import atomic_write_text
from ..progress import progress_bar, progress_wanted
from .checkpoint import LoopState
from .distributed import TrainRuntime
from .step import StepResult


def trim_log(path: Path, step: int) -> None:
    """Keep only the log records of steps up to `step`, where training (re)starts: a run stopped
    after its last checkpoint logged steps that the resumed run logs again. A line cut short by
    a kill goes too. Rewritten atomically, and only when something goes."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunLog:
    """The JSONL metrics log (main process only) and the progress: a bar on a terminal, else
    one plain line per logged step and per validation, so a log file stays readable."""

    def __init__(self, path: Path, rt: TrainRuntime, progress: bool, total: int, initial: int, desc: str,
                 log: Callable[[str], None]):
        if rt.is_main:
            trim_log(path, initial)
        self.file = open(path, "a", encoding="utf-8") if rt.is_main else None
        self.bar = None
        self.lines = progress and rt.is_main and not progress_wanted()
        self.total, self.desc, self.log = total, desc, log
        if progress and rt.is_main and not self.lines:
            self.bar = progress_bar(desc=desc, unit="step", total=total, initial=initial, leave=True)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def train(self, state: LoopState, step: StepResult, tok_s: float, flops: float | None, peak: float | None,
              world_size: int) -> None:
        """Write and show the figures of a training step."""
        record = {"event": "train", "step": state.step, "loss": step.loss, "lr": step.lr,
                  "tokens": state.tokens, "tokens_per_s": tok_s, "grad_norm": step.grad_norm}
        if flops is not None:
            record["tflops"] = tok_s * flops / 1e12
            if peak:
                record["mfu"] = tok_s * flops / (peak * world_size)
        self.write(record)
        self.report(state.step, {"loss": f"{step.loss:.3f}", "tok_s": f"{tok_s:,.0f}"})

    def report(self, step: int, values: dict) -> None:
        """Show the latest figures: on the bar, or as a line of the log."""
        if not values:
            return
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
        elif self.lines:
            self.log(f"{self.desc} step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in values.items()))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
