"""CPU decode against the memory-bandwidth floor: GPT-2 124M shape, 1 and 2 threads, one interleaved run.

Decoding one token reads every weight once, so the floor of a step is (bytes a step reads) /
(read bandwidth). This script exports one random-weight model of the GPT-2 124M shape in each
precision CompactGPT ships (fp32; int8 per channel on MatMulNBits and on DynamicQuantizeMatMul;
int4 g32 and g128, the LM head and the lookup from one set of codes) plus ONNX Runtime's own
dynamic int8 of the fp32 export as the baseline, all with the shared KV cache, and measures in
rounds that interleave every variant and thread count: the median decode step of a 64-token
greedy run (batch 1) as a fraction of its floor, with the read bandwidth measured in the same run
(the better of a 1 GiB float32 sum and matrix-vector product, per thread count). It also times the step at token 50 and at token 1,000 of
one long generation (fp32, 2 threads) for the shared and the copying KV cache.

    python -m benchmarks.decode_bandwidth
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.export_speed import onnx_bytes_per_token, read_bandwidth, time_generation
from compactgpt.machine import describe, machine_info

RESULTS = Path(__file__).parent / "results"
# The GPT-2 vocabulary padded to a multiple of 64: quantized rows pack evenly.
SHAPE = dict(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
# variant -> (quantization or None, export settings)
VARIANTS = {
    "fp32": (None, {}),
    "ORT dynamic int8": (None, {"ort_int8": True}),
    "int8 MatMulNBits": ((8, 0), {}),
    "int8 DynamicQuantizeMatMul": ((8, 0), {"int8_kernel": "dynamic"}),
    "int4 g128": ((4, 128), {}),
    "int4 g32": ((4, 32), {}),
}


def build(work: Path, log) -> dict[str, Path]:
    """Every variant's export folder (reused when present)."""
    from compactgpt.artifacts import save_model
    from compactgpt.model import GPT, GPTConfig
    from compactgpt.tokenizer import train_bpe
    from export import ExportConfig, export_onnx
    from quantize import RTNConfig, quantize_folder

    source = work / "model"
    if not (source / "manifest.json").is_file():
        torch.manual_seed(0)
        tok = train_bpe([Path(__file__).read_text()] * 4, vocab_size=1000)
        config = GPTConfig(**SHAPE, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
        save_model(source, GPT(config).eval(), tok, stage="pretrain", settings={})
    folders = {}
    for name, (quant, settings) in VARIANTS.items():
        model = source
        if quant:
            bits, group = quant
            model = work / f"rtn-{bits}-g{group}"
            if not (model / "manifest.json").is_file():
                log(f"quantizing int{bits} g{group}")
                quantize_folder(source, model, RTNConfig(bits=bits, group_size=group, include_embeddings=True),
                                progress=False, log=log)
        out = work / name.replace(" ", "-")
        if not (out / "manifest.json").is_file():
            log(f"exporting {name}")
            export_onnx(ExportConfig(model=str(model), out=str(out), kv_cache="shared", **settings), log=log)
        folders[name] = out
    return folders


def streaming_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the better of a 1 GiB float32 sum and a 1 GiB float32
    matrix-vector product (what a decode step does), medians of `repeats`. One probe alone
    under-reads on one thread (measured 13.7 GB/s by the sum while ONNX Runtime's fp32 decode
    read 15.2)."""
    torch.set_num_threads(threads)
    w = torch.ones(int(gib * 2**30) // 4 // 4096, 4096)
    v = torch.ones(4096)
    torch.mv(w, v)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(w, v)
        times.append(time.perf_counter() - t)
    return max(read_bandwidth(threads, gib, repeats), w.numel() * 4 / statistics.median(times))


def median_step(folder: Path, threads: int, new_tokens: int = 64, prompt: int = 16) -> float:
    """Median decode step (seconds) of one greedy run after a short warm-up."""
    from export import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads, verify=False)
    ids = torch.randint(0, 900, (1, prompt), generator=torch.Generator().manual_seed(0))
    for _ in decoder.stream(ids, 4):
        pass
    return time_generation(decoder.stream, ids, new_tokens)[1]


def step_at_lengths(folder: Path, threads: int, at: tuple[int, ...] = (50, 1000), window: int = 20) -> dict[int, float]:
    """Median step (seconds) around each length `at` of one long greedy generation."""
    from export import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads, verify=False)
    ids = torch.randint(0, 900, (1, 8), generator=torch.Generator().manual_seed(1))
    steps, last = [], None
    for _ in decoder.stream(ids, max(at) + window // 2):
        now = time.perf_counter()
        steps.append(now - last if last is not None else 0.0)
        last = now
    return {n: statistics.median(steps[n - window // 2:n + window // 2]) for n in at}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("runs/decode_bandwidth"), help="exports (reused when present)")
    p.add_argument("--out", type=Path, default=RESULTS / "decode_bandwidth")
    args = p.parse_args()
    folders = build(args.work, log=lambda m: print(m, file=sys.stderr))
    bytes_per_token = {name: onnx_bytes_per_token(f / "model.onnx") for name, f in folders.items()}
    bandwidth = {t: [] for t in (1, 2)}
    steps = {(name, t): [] for name in folders for t in (1, 2)}
    for r in range(args.rounds):
        for t in (1, 2):
            bandwidth[t].append(streaming_bandwidth(t))
            for name, folder in folders.items():
                steps[(name, t)].append(median_step(folder, t))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    # The same fp32 model with the copying cache, for the step-at-length comparison.
    from export import ExportConfig, export_onnx

    copying = args.work / "fp32-copy"
    if not (copying / "manifest.json").is_file():
        export_onnx(ExportConfig(model=str(args.work / "model"), out=str(copying)), log=lambda m: None)
    lengths = {"shared": step_at_lengths(folders["fp32"], 2), "copy": step_at_lengths(copying, 2)}

    bw = {t: statistics.median(v) for t, v in bandwidth.items()}
    rows = []
    for (name, t), xs in steps.items():
        step = statistics.median(xs)
        floor = bytes_per_token[name] / bw[t]
        rows.append({"variant": name, "threads": t, "tok_s": 1 / step, "step_ms": step * 1e3,
                     "mb_per_token": bytes_per_token[name] / 1e6, "floor_fraction": floor / step,
                     "rounds_ms": [x * 1e3 for x in xs]})
    result = {"machine": machine_info(), "shape": SHAPE, "bandwidth_gb_s": {t: b / 1e9 for t, b in bw.items()},
              "rows": rows, "step_ms_at_length": {k: {n: s * 1e3 for n, s in v.items()} for k, v in lengths.items()},
              "command": "python -m benchmarks.decode_bandwidth " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result, args.rounds)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def to_markdown(result: dict, rounds: int) -> str:
    bw = result["bandwidth_gb_s"]
    lines = [
        "# CPU decode against the memory-bandwidth floor (GPT-2 124M shape)",
        "",
        f"Machine: {describe(result['machine'])}. Read bandwidth measured in the same run: {bw[1]:.1f} GB/s "
        f"(1 thread), {bw[2]:.1f} GB/s (2 threads).",
        f"Random weights, {SHAPE['n_layer']} x {SHAPE['n_embd']}, vocab {SHAPE['vocab_size']}; batch 1, greedy, "
        f"a 16-token prompt, median decode step of 64 tokens; {rounds} rounds interleaving every variant and "
        "thread count; every export with the shared KV cache. Floor = bytes a step reads (every weight, the "
        "embedding tables once per token row) / read bandwidth.",
        f"Command: `{result['command']}`",
        "",
        "| variant | threads | MB read / token | tok/s | step ms | % of floor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["threads"], -r["mb_per_token"])):
        lines.append(f"| {r['variant']} | {r['threads']} | {r['mb_per_token']:.0f} | {r['tok_s']:.1f} | "
                     f"{r['step_ms']:.2f} | {r['floor_fraction']:.0%} |")
    s = result["step_ms_at_length"]
    lines += ["", "Step time over one long generation (fp32, 2 threads), median of 20 steps around each length:", "",
              "| KV cache | token 50 ms | token 1,000 ms | ratio |", "| --- | --- | --- | --- |"]
    for kind in ("shared", "copy"):
        a, b = s[kind][50], s[kind][1000]
        lines.append(f"| {kind} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
