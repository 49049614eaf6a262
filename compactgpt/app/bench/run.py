"""The bench stage: every model of the config measured, then the report written to its out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from ...machine import machine_info
from ...outputs import claim_output
from ..report import build_report, write_report
from .config import BenchConfig
from .folders import check_models
from .measure import eval_token_ids, measure, runtime_missing


def write_bench_report(folders: dict[str, str], measurements: dict[str, dict], config: BenchConfig,
                       out: str | Path) -> dict:
    """Build the report of these measurements (row name -> folder, row name -> measure's record)
    with this machine, the config's thread count, its baseline (or the first language model)
    and its command, and write it to `out`; returns the report dict."""
    machine = machine_info()
    machine["torch_threads"] = config.threads
    report = build_report(folders, measurements, config.to_dict(), machine, baseline=config.baseline or None,
                          command=config.command or None)
    write_report(report, out)
    return report


def _log_measurement(log: Callable[[str], None], m: dict, seconds: float) -> None:
    if "absent" in m:
        log(f"  not measured: {m['absent']}")
    elif "accuracy" in m:
        log(f"  accuracy {m['accuracy']:.4f}, {m['latency_ms_median']:.1f} ms per example  [{seconds:.0f}s]")
    else:
        log(f"  perplexity {m['perplexity']:.3f}, decode {m['speed'][0]['decode_tok_s']:.0f} tok/s (batch "
            f"{m['speed'][0]['batch']}), {m['file_bytes'] / 1e6:.1f} MB  [{seconds:.0f}s]")


def bench(config: BenchConfig, log: Callable[[str], None] = print) -> Path:
    """Measure every folder of `config.models` and write report.json / report.md / plots to
    `config.out`, which it returns. The models, out and data must be given (ConfigError).
    Every folder and the data are checked before the first measurement (ArtifactError,
    ConfigError), and out is claimed (compactgpt.outputs.claim_output: never a measured folder
    or one above it; an earlier report is replaced, another artifact only with overwrite)."""
    if not config.models or not config.out:
        raise ConfigError("bench needs the models to measure and a folder for the report: give --models and --out")
    if not config.data:
        raise ConfigError("--data is required: a prepared data folder made with the models' tokenizer")
    with claim_output(config.out, stage="bench", inputs={"--models": config.models, "--data": config.data},
                      overwrite=config.overwrite):
        _measure_all(config, log)
    return Path(config.out)


def _measure_all(config: BenchConfig, log: Callable[[str], None]) -> None:
    folders, names = config.models, config.row_names
    kinds = check_models(folders)
    if all(k == "classifier" for k in kinds):
        raise ConfigError("every model is a classifier; bench needs at least one language model as the baseline")
    first_lm = next(f for f, k in zip(folders, kinds) if k != "classifier")
    eval_token_ids(config.data, first_lm)
    reference = folders[names.index(config.baseline)] if config.baseline else first_lm
    missing = runtime_missing(kinds[folders.index(reference)])
    if missing:
        raise ConfigError(f"the baseline {reference} cannot run here: {missing}; or choose another --baseline")
    measurements = {}
    for i, (name, folder) in enumerate(zip(names, folders), 1):
        log(f"[bench {i}/{len(folders)}] {name} ({folder})")
        t = time.perf_counter()
        measurements[name] = measure(folder, config, reference=reference)
        _log_measurement(log, measurements[name], time.perf_counter() - t)
    write_bench_report(dict(zip(names, map(str, folders))), measurements, config, config.out)
