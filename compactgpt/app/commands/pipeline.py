"""The pipeline verb: every stage from a config, corpus to benchmark report, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The pipeline flags: --config, --out, --plan, --no-progress."""
    p.description = (
        "Run corpus -> tokenizer -> teacher (-> finetune) -> students -> quantized variants -> ONNX exports -> "
        "bench -> report, one folder per stage under --out. Stages whose artifact already matches the config "
        "are skipped; a changed setting reruns that stage and those after it; an interrupted training stage "
        "resumes from its checkpoint. The whole config is validated before any work starts."
    )
    p.add_argument("--config", help="pipeline JSON file, or a built-in name: default (a small teacher on a few CPU "
                   "cores) or gpu (GPT-2-124M-shaped teacher on one GPU); default: default")
    p.add_argument("--out", required=True, help="folder for every stage's artifact and the report")
    p.add_argument("--plan", action="store_true", help="print which stages would run or be skipped, and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars within stages")


def run_pipeline(args: argparse.Namespace) -> None:
    """Run (or with --plan, only show) every stage of --config under --out; print the report's path."""
    # The library's run_pipeline(config, out, ...) is reached through its package, so this
    # verb function does not shadow it.
    from .. import pipeline

    config = pipeline.load_config(args.config)
    pipeline.run_pipeline(config, args.out, log=lambda m: print(m, file=sys.stderr, flush=True),
                          progress=not args.no_progress, only_plan=args.plan)
    if not args.plan:
        print(Path(args.out) / "report" / "report.md")
