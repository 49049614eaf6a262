"""Decode with the weights on transparent huge pages: glibc's malloc asked for them, or not.

Where transparent huge pages are enabled only on request (`madvise`, the usual default),
ONNX Runtime's weight buffers sit on 4 KiB pages, and a decode step that streams every weight
once walks tens of thousands of pages. glibc 2.35+ asks for huge pages for its own allocations
when the process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1. This script runs the
exports of `benchmarks/decode_bandwidth.py` (124M shape; run that first) in fresh processes
with and without the setting, alternating them, and reports the median decode step and the
resident memory of each.

    python -m benchmarks.hugepages
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import write_results
from benchmarks.decode_bandwidth import HUGE_TUNABLE as TUNABLE
from compactgpt.machine import describe, machine_info

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("fp32", "int8-MatMulNBits", "int4-g128")

_CHILD = """
import json, os, statistics, sys
from pathlib import Path
from benchmarks.decode_bandwidth import median_step
folder, threads = Path(sys.argv[1]), int(sys.argv[2])
steps = [median_step(folder, threads) for _ in range(3)]
status = dict(line.split(":", 1) for line in open(f"/proc/{os.getpid()}/status") if ":" in line)
rollup = dict(line.split(":", 1) for line in open(f"/proc/{os.getpid()}/smaps_rollup") if ":" in line)
print(json.dumps({"step": statistics.median(steps), "rss_kb": int(status["VmRSS"].split()[0]),
                  "huge_kb": int(rollup["AnonHugePages"].split()[0])}))
"""


def run_child(folder: Path, threads: int, huge: bool) -> dict:
    env = dict(os.environ)
    if huge:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(threads)], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/decode_bandwidth"), help="decode_bandwidth's exports")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "hugepages")
    args = p.parse_args()
    if sys.platform != "linux":
        sys.exit("huge pages through glibc's malloc: Linux only")
    folders = {v: args.work.resolve() / v for v in VARIANTS}
    missing = [str(f) for f in folders.values() if not (f / "manifest.json").is_file()]
    if missing:
        sys.exit(f"missing exports {missing}: run `python -m benchmarks.decode_bandwidth` first")
    samples: dict[tuple, list] = {}
    for r in range(args.rounds):
        for name, folder in folders.items():
            for threads in (1, 2):
                for huge in (False, True):
                    samples.setdefault((name, threads, huge), []).append(run_child(folder, threads, huge))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for (name, threads, huge), xs in samples.items():
        rows.append({"variant": name, "threads": threads, "huge_pages": huge,
                     "step_ms": statistics.median(x["step"] for x in xs) * 1e3,
                     "rss_mb": statistics.median(x["rss_kb"] for x in xs) / 1024,
                     "huge_mb": statistics.median(x["huge_kb"] for x in xs) / 1024,
                     "rounds_ms": [x["step"] * 1e3 for x in xs]})
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    result = {"machine": machine_info(), "thp": thp.read_text().strip() if thp.is_file() else None, "rows": rows,
              "command": "python -m benchmarks.hugepages " + " ".join(sys.argv[1:])}
    write_results(args.out, result, to_markdown(result, args.rounds))


def to_markdown(result: dict, rounds: int) -> str:
    lines = [
        "# Decode with and without huge pages for the weights (GPT-2 124M shape)",
        "",
        f"Machine: {describe(result['machine'])}; transparent huge pages: `{result['thp']}`. Each cell: a fresh "
        f"process, median of 3 decode runs (64 tokens, batch 1, shared KV cache); {rounds} rounds alternating "
        f"with and without `GLIBC_TUNABLES={TUNABLE}`; medians. RSS: resident memory at the end of the process.",
        f"Command: `{result['command']}`",
        "",
        "| variant | threads | step ms (4 KiB pages) | step ms (huge pages) | speed-up | RSS MB | RSS MB (huge) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["variant"], r["threads"], r["huge_pages"]): r for r in result["rows"]}
    for name in VARIANTS:
        for threads in (1, 2):
            a, b = by[(name, threads, False)], by[(name, threads, True)]
            lines.append(f"| {name} | {threads} | {a['step_ms']:.2f} | {b['step_ms']:.2f} | "
                         f"{a['step_ms'] / b['step_ms']:.2f}x | {a['rss_mb']:.0f} | {b['rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
