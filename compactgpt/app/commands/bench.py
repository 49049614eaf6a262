"""The bench verb: measure artifact folders side by side and write a report."""

from __future__ import annotations

import argparse
import json
import sys

from ...config import add_config_args, given_args


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The bench flags: --json, then one flag per BenchConfig field (--models, --out, --data, ...)."""
    from ..bench import BenchConfig

    p.description = (
        "Measure every model folder the same way: perplexity through the artifact's own runtime, parameters, "
        "file size, time to first token, decode and prefill tokens/s (medians and p90 over repeats at fixed "
        "threads), peak memory in a separate process. Writes report.md, report.json and PNG plots to --out, "
        "with the first model (or --baseline) as the baseline row."
    )
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    add_config_args(p, BenchConfig, show_defaults=True)


def run_bench(args: argparse.Namespace) -> None:
    """Measure --models, write the report to --out and print its path (or, with --json, the report)."""
    from ..bench import BenchConfig, bench
    from ..report import load_report

    config = BenchConfig(**given_args(args, BenchConfig), command="compactgpt " + " ".join(sys.argv[1:]))
    out = bench(config, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(load_report(out / "report.json"), indent=2))
    else:
        print(out / "report.md")
