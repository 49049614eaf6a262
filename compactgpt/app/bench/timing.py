"""Timing: pure statistics and the stream timer (warm-up runs, repeats, per-step times)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ...errors import ConfigError


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class StreamTiming:
    """Times of generation runs: first-token latency and per-step decode latency."""

    ttft_s: list[float]  # one per timed run: call -> first token
    step_s: list[float]  # every decode step of every timed run: token i-1 -> token i

    def summary(self, batch: int, prompt_tokens: int) -> dict:
        """Medians, p90 and throughputs of these runs at `batch` sequences of `prompt_tokens`."""
        ttft = statistics.median(self.ttft_s)
        step = statistics.median(self.step_s)
        return {
            "batch": batch,
            "ttft_ms_median": ttft * 1e3,
            "ttft_ms_p90": percentile(self.ttft_s, 90) * 1e3,
            "step_ms_median": step * 1e3,
            "step_ms_p90": percentile(self.step_s, 90) * 1e3,
            # Tokens per second across the batch: every step yields one token per sequence.
            "decode_tok_s": batch / step,
            # The first token is the prefill's output: prompt tokens over time to first token.
            "prefill_tok_s": batch * prompt_tokens / ttft,
            "runs": len(self.ttft_s),
            "steps": len(self.step_s),
        }


def device_clock(device: torch.device) -> Callable[[], float]:
    """A clock for work on `device`: CUDA kernels run asynchronously, so the clock waits for
    the device to finish what was queued before it reads the time."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def time_stream(make_stream: Callable[[], Iterator], warmup: int, repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> StreamTiming:
    """Run `make_stream()` to exhaustion warmup + repeats times; time the timed runs.

    The first yield of a run marks the first token (prefill included); each later yield one
    decode step. Raises ConfigError when a run yields fewer than two tokens."""
    ttft: list[float] = []
    steps: list[float] = []
    for run in range(warmup + repeats):
        t0 = clock()
        last = t0
        first = True
        for _ in make_stream():
            now = clock()
            if run >= warmup:
                if first:
                    ttft.append(now - t0)
                else:
                    steps.append(now - last)
            first = False
            last = now
        if run >= warmup and first:
            raise ConfigError("the generation stream yielded no tokens; new_tokens must be >= 1")
    if not steps:
        raise ConfigError("no decode steps were timed; new_tokens must be >= 2")
    return StreamTiming(ttft, steps)
