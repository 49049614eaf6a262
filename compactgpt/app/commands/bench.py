"""The bench verb: measure artifact folders side by side and write a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...config import add_config_args, given_args
from ...errors import ConfigError


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The bench flags: the models and report folder, then one flag per BenchConfig field."""
    from ..bench import BenchConfig

    p.description = (
        "Measure every model folder the same way: perplexity through the artifact's own runtime, parameters, "
        "file size, time to first token, decode and prefill tokens/s (medians and p90 over repeats at fixed "
        "threads), peak memory in a separate process. Writes report.md, report.json and PNG plots to --out, "
        "with the first model (or --baseline) as the baseline row."
    )
    p.add_argument("--models", nargs="+", required=True, metavar="DIR", help="artifact folders to measure")
    p.add_argument("--names", nargs="+", help="row names (default: the folder names)")
    p.add_argument("--baseline", help="name of the baseline row (default: the first model)")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    p.add_argument("--overwrite", action="store_true", help="write the report into a folder that holds an artifact "
                   "(an earlier report there is always replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(p, BenchConfig, show_defaults=True)


def run_bench(args: argparse.Namespace) -> None:
    """Measure --models, write the report to --out and print its path (or, with --json, the report)."""
    # The library's run_bench(folders, config, out, ...) is reached through its module, so
    # this verb function does not shadow it.
    from .. import bench

    given = given_args(args, bench.BenchConfig)
    if not given.get("data"):
        raise ConfigError("--data is required: a prepared data folder made with the models' tokenizer")
    config = bench.BenchConfig(**given)
    if args.names and len(args.names) != len(args.models):
        raise ConfigError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    report = bench.run_bench(args.models, config, args.out, names=args.names, baseline=args.baseline,
                             log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress,
                             command="compactgpt " + " ".join(sys.argv[1:]), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(Path(args.out) / "report.md")
