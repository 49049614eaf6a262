"""Decode speed in the browser against ONNX Runtime in Python, on the same ONNX exports.

For each export (by default the teacher and the headline int4 student of a pipeline run) it
builds the default web bundle (and, for a quantized export, one that keeps MatMulNBits:
--no-fold-weights) and measures, in interleaved rounds on the same machine:

* the page in headless Chromium, WASM backend, `--threads` threads (served cross-origin
  isolated), greedy, batch 1: median decode step from the page's own per-token clock;
* ONNX Runtime in Python (CPU provider, same threads), CompactGPT's KV-cache loop: median
  decode step of the same prompt and token count.

Every run generates the same fixed number of tokens (past <|endoftext|>); the greedy tokens of
the page and of Python are compared as well (a folded bundle computes with float activations, an
export at accuracy_level 4 with int8 ones: their tokens may part). Reports the bundles' sizes (model, runtime).

    python -m benchmarks.browser_decode --run runs/pipeline
    python -m benchmarks.browser_decode --exports runs/pipeline/teacher-onnx runs/pipeline/student-l2-int4-onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.export_speed import time_generation
from compactgpt.app.deploy import DeployConfig, deploy, web
from compactgpt.machine import describe, machine_info
from export import open_decoder

RESULTS = Path(__file__).parent / "results"
PROMPT = "def read_config(path):\n    "


def pick_exports(run: Path) -> list[Path]:
    """The teacher's fp32 export and the int4 student export of a pipeline run with the fewest
    bytes (the headline student of the default pipeline)."""
    teacher = run / "onnx" / "teacher"
    int4 = sorted((p for p in (run / "onnx").glob("*-int4") if (p / "model.onnx").is_file()),
                  key=lambda p: (p / "model.onnx").stat().st_size)
    if not (teacher / "model.onnx").is_file() or not int4:
        sys.exit(f"error: {run} has no onnx/teacher or onnx/*-int4 export; run the pipeline first or pass --exports")
    return [teacher, int4[0]]


def is_quantized(folder: Path) -> bool:
    import onnx

    return any(n.op_type == "MatMulNBits" for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def python_decode(folder: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> tuple[float, list[int]]:
    """(median decode step s, tokens) of ONNX Runtime in Python, greedy, no stop token."""
    decoder, _ = open_decoder(folder, threads=threads)
    _, step, tokens = time_generation(decoder.stream, torch.tensor([prompt_ids]), new_tokens)
    return step, tokens


def browser_decode(bundle: Path, new_tokens: int, threads: int) -> tuple[float, list[int], dict]:
    page = web.run_page(bundle, PROMPT, new_tokens, threads=threads, backend="wasm", no_stop=True)
    state = page["state"]
    return statistics.median(state["stepMs"]) / 1000, state["newIds"], state


def reference_tokens(row: dict, new_tokens: int, threads: int) -> list[int]:
    """Greedy tokens of ONNX Runtime in Python on the graph whose arithmetic the page follows
    (for a quantized export: float activations, see compactgpt.app.deploy.web.reference_graph)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        reference = web.reference_graph(row["bundles"]["browser"], row["folder"], None, Path(scratch))
        return python_decode(reference, row["prompt_ids"], new_tokens, threads)[1]


def chromium_version() -> str:
    out = subprocess.run([web.find_chromium(), "--version"], capture_output=True, text=True).stdout.strip()
    return out or "unknown"


def run(exports: list[Path], work: Path, rounds: int, new_tokens: int, threads: int, log) -> list[dict]:
    rows = []
    for folder in exports:
        # A quantized export is measured twice in the browser: weights folded to float32 by the page
        # (the default bundle) and MatMulNBits as exported (--no-fold-weights).
        variants = [(folder.name, True)] + ([(f"{folder.name}, MatMulNBits in the browser", False)]
                                            if is_quantized(folder) else [])
        for label, fold in variants:
            bundle = work / (folder.name + ("" if fold else "-matmulnbits"))
            deploy(DeployConfig(model=str(folder), target="web", out=str(bundle), check="never", threads=threads,
                                fold_weights=fold, overwrite=True), log=lambda m: None)
            _, tok = open_decoder(folder, verify=False)
            rows.append({"model": label, "folder": folder, "bundles": {"browser": bundle},
                         "prompt_ids": tok.encode(PROMPT), "steps": {"python": [], "browser": []}, "tokens": {}})
    for r in range(rounds):
        for row in rows:  # interleaved: every backend of every model once per round
            step, tokens = python_decode(row["folder"], row["prompt_ids"], new_tokens, threads)
            row["steps"]["python"].append(step)
            row["tokens"]["python"] = tokens
            for build, bundle in row["bundles"].items():
                step, tokens, state = browser_decode(bundle, new_tokens, threads)
                row["steps"][build].append(step)
                row["tokens"][build] = tokens
                row["threads"] = state["threads"]
            log(f"round {r + 1}/{rounds} {row['model']}: " + ", ".join(
                f"{k} {1 / v[-1]:.0f} tok/s" for k, v in row["steps"].items()))
    records = []
    for row in rows:
        metrics = json.loads((row["bundles"]["browser"] / "manifest.json").read_text())["metrics"]
        py, browser = statistics.median(row["steps"]["python"]), statistics.median(row["steps"]["browser"])
        records.append({
            "model": row["model"], "threads": threads, "page_threads": row.get("threads"), "new_tokens": new_tokens,
            "python_tok_s": 1 / py, "browser_tok_s": 1 / browser, "browser_vs_python": py / browser,
            "python_rounds_tok_s": [1 / x for x in row["steps"]["python"]],
            "browser_rounds_tok_s": [1 / x for x in row["steps"]["browser"]],
            "same_tokens": row["tokens"]["browser"] == reference_tokens(row, new_tokens, threads),
            **{k: metrics[k] for k in ("bundle_bytes", "model_bytes", "wasm_download_bytes", "runtime_wasm_bytes",
                                       "runtime_webgpu_bytes", "onnxruntime_web")},
        })
    return records


def to_markdown(records: list[dict], machine: dict, args, chromium: str) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    lines = [
        "# Decode speed in the browser (onnxruntime-web, WASM) vs ONNX Runtime in Python",
        "",
        f"Machine: {describe(machine)}. {chromium} headless; onnxruntime-web {records[0]['onnxruntime_web']}; "
        f"onnxruntime {machine['versions'].get('onnxruntime-gpu') or machine['versions'].get('onnxruntime')} "
        "(Python, CPU provider).",
        f"Batch 1, greedy, {records[0]['new_tokens']} new tokens after a {len(PROMPT)}-character prompt, "
        f"{args.threads} threads both sides (the page was cross-origin isolated: {records[0]['page_threads']} "
        f"WASM threads); median decode step over {args.rounds} interleaved rounds (each round a fresh browser).",
        "",
        f"Command: `python -m benchmarks.browser_decode {' '.join(sys.argv[1:])}`",
        "",
        "| model | ONNX Runtime, Python tok/s | browser (WASM) tok/s | browser / Python | same greedy tokens* |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(f"| {r['model']} | {r['python_tok_s']:,.0f} | {r['browser_tok_s']:,.0f} | "
                     f"{r['browser_vs_python']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |")
    lines += ["", "*as ONNX Runtime in Python on the same arithmetic: onnxruntime-web's WASM kernels compute "
              "MatMulNBits with float activations, so a quantized export is compared with its folded graph "
              "(an export at accuracy_level 4 quantizes activations to int8 in Python, and its greedy tokens "
              "part from the browser's).",
              "", "Web folder size (`compactgpt deploy --target web`, default settings):", "",
              "| model | model files | downloaded by a browser without WebGPU | whole folder (WASM + WebGPU builds) |",
              "| --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['model']} | {mb(r['model_bytes'])} | {mb(r['wasm_download_bytes'])} "
                     f"(onnxruntime-web WASM build {mb(r['runtime_wasm_bytes'])}) | {mb(r['bundle_bytes'])} |")
    lines += ["", "Per-round tok/s (Python; browser):", ""]
    for r in records:
        fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
        lines.append(f"- {r['model']}: {fmt(r['python_rounds_tok_s'])}; {fmt(r['browser_rounds_tok_s'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a pipeline run folder: its teacher-onnx and smallest *int4-onnx")
    p.add_argument("--exports", type=Path, nargs="+", help="ONNX export folders (instead of --run)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/browser-bench"), help="where the bundles are written")
    p.add_argument("--out", type=Path, default=RESULTS / "browser")
    args = p.parse_args()
    if web.runtime_missing():
        sys.exit(f"error: {web.runtime_missing()}")
    exports = args.exports or (pick_exports(args.run) if args.run else None)
    if not exports:
        sys.exit("error: give --run PIPELINE_RUN or --exports FOLDER...")
    torch.set_num_threads(args.threads)
    records = run(exports, args.work, args.rounds, args.new_tokens, args.threads, log=print)
    machine = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "chromium": chromium_version(),
                                                         "records": records}, indent=2))
    args.out.with_suffix(".md").write_text(to_markdown(records, machine, args, chromium_version()))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
