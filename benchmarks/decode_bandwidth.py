"""CPU decode against the memory-bandwidth floor: GPT-2 124M shape and the default student's
shape, 1 and 2 threads, one interleaved run.

Decoding one token reads every weight once, so the floor of a step is (bytes a step reads) /
(read bandwidth). For each shape this script exports one random-weight model in each precision
CompactGPT ships (fp32; int8 per channel on MatMulNBits and on DynamicQuantizeMatMul; int4 g32
and g128, and int4 g128 blocks with an int8 head; the LM head and the lookup always from one set
of codes) plus ONNX Runtime's own quantizers
of the fp32 export as baselines (dynamic int8; MatMulNBitsQuantizer int4 g32 and g128), all with
the shared KV cache, and measures in rounds that interleave every shape, variant and thread
count: the median decode step of a 64-token greedy run (batch 1) as a fraction of its floor,
with the read bandwidth measured in the same run (the better of a 1 GiB float32 sum and
matrix-vector product, per thread count). It also times the step at token 50 and at token 1,000
of one long generation (fp32, 124M shape, 2 threads) for the shared and the copying KV cache.

    python -m benchmarks.decode_bandwidth
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import write_results
from benchmarks.export_speed import onnx_bytes_per_token, read_bandwidth, time_generation
from compactgpt.machine import describe, machine_info

RESULTS = Path(__file__).parent / "results"
HUGE_TUNABLE = "glibc.malloc.hugetlb=1"
SHAPES = {
    # The GPT-2 vocabulary padded to a multiple of 64: quantized rows pack evenly.
    "gpt2-124m": dict(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # The default pipeline's smallest student (student-l2-mlp512): it fits in the L2 cache.
    "student": dict(vocab_size=8192, n_positions=256, n_embd=256, n_layer=2, n_head=4, n_inner=512),
}
# variant -> (CompactGPT quantization or None, export settings, ONNX Runtime int4 block or None)
VARIANTS = {
    "fp32": (None, {}, None),
    "ORT dynamic int8": (None, {"ort_int8": True}, None),
    "int8 MatMulNBits": ((8, 0), {}, None),
    "int8 DynamicQuantizeMatMul": ((8, 0), {"int8_kernel": "dynamic"}, None),
    "int4 g128": ((4, 128), {}, None),
    "int4 g32": ((4, 32), {}, None),
    "int4 g128, int8 head": ((4, 128, 8), {}, None),
    "ORT MatMulNBitsQuantizer int4 g128": (None, {}, 128),
    "ORT MatMulNBitsQuantizer int4 g32": (None, {}, 32),
}


def ort_int4(fp32: Path, out: Path, block_size: int) -> None:
    """ONNX Runtime's own int4 weight-only quantizer (MatMulNBitsQuantizer, asymmetric, int8
    activations as CompactGPT's int4 exports use) applied to the fp32 export, in a copy of its
    folder. It quantizes the MatMuls, the LM head included; the lookup keeps the float table."""
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32, tmp)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=block_size,
                                     is_symmetric=False, accuracy_level=4)
    quantizer.process()
    (tmp / "model.onnx.data").unlink(missing_ok=True)
    onnx.save_model(quantizer.model.model, str(tmp / "model.onnx"))
    tmp.rename(out)


def build(work: Path, shape: dict, log) -> dict[str, Path]:
    """Every variant's export folder for one shape (reused when present)."""
    from compactgpt.artifacts import save_model
    from compactgpt.model import GPT, GPTConfig
    from compactgpt.tokenizer import train_bpe
    from export import ExportConfig, export_onnx
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    source = work / "model"
    if not (source / "manifest.json").is_file():
        torch.manual_seed(0)
        tok = train_bpe([Path(__file__).read_text()] * 4, vocab_size=1000)
        config = GPTConfig(**shape, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
        save_model(source, GPT(config).eval(), tok, stage="pretrain", settings={})
    folders = {}
    for name, (quant, settings, ort_block) in VARIANTS.items():
        out = work / name.replace(",", "").replace(" ", "-")
        if ort_block:
            if not (out / "manifest.json").is_file():
                log(f"quantizing the fp32 export with {name}")
                ort_int4(folders["fp32"], out, ort_block)
            folders[name] = out
            continue
        model = source
        if quant:
            bits, group, head_bits = (*quant, 0)[:3]
            model = work / (f"rtn-{bits}-g{group}" + (f"-head{head_bits}" if head_bits else ""))
            if not (model / "manifest.json").is_file():
                log(f"quantizing int{bits} g{group}")
                method = RTNConfig(bits=bits, group_size=group, include_embeddings=True, head_bits=head_bits)
                quantize_folder(QuantizeConfig(model=str(source), out=str(model), method=method, progress=False),
                                log=log)
        if not (out / "manifest.json").is_file():
            log(f"exporting {name}")
            export_onnx(ExportConfig(model=str(model), out=str(out), kv_cache="shared", **settings), log=log)
        folders[name] = out
    return folders


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


def bits_per_parameter(folder: Path, shape: dict) -> float:
    """Graph files on disk (model.onnx and its data) over the model's parameters, in bits."""
    from compactgpt.artifacts import implied_parameters
    from compactgpt.model import GPTConfig

    files = [folder / "model.onnx", folder / "model.onnx.data"]
    return 8 * sum(f.stat().st_size for f in files if f.is_file()) / implied_parameters(GPTConfig(**shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--work", type=Path, default=Path("runs/decode_bandwidth"), help="exports (reused when present)")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (default: results/decode_bandwidth[_hugepages])")
    p.add_argument("--huge-pages", action="store_true", help="rerun this process with glibc's malloc asking for "
                   "transparent huge pages (GLIBC_TUNABLES, see benchmarks/hugepages.py), so every variant's "
                   "weights sit on them")
    args = p.parse_args()
    if args.huge_pages and HUGE_TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
        env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), HUGE_TUNABLE]))}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.decode_bandwidth", *sys.argv[1:]], env)
    args.out = args.out or RESULTS / ("decode_bandwidth_hugepages" if args.huge_pages else "decode_bandwidth")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    # The 124M shape keeps the work folder's top level (exports from earlier runs stay valid).
    works = {shape: args.work if shape == "gpt2-124m" else args.work / shape for shape in args.shapes}
    folders = {(shape, name): f for shape in args.shapes for name, f in build(works[shape], SHAPES[shape], log).items()}
    bytes_per_token = {key: onnx_bytes_per_token(f / "model.onnx") for key, f in folders.items()}
    bandwidth = {t: [] for t in (1, 2)}
    steps = {(key, t): [] for key in folders for t in (1, 2)}
    for r in range(args.rounds):
        for t in (1, 2):
            bandwidth[t].append(read_bandwidth(t))
            for key, folder in folders.items():
                steps[(key, t)].append(median_step(folder, t))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    # The same models with the copying cache, for the step-at-length comparison (124M shape).
    from export import ExportConfig, export_onnx

    lengths = {}
    if "gpt2-124m" in args.shapes:
        work = works["gpt2-124m"]
        for name, source in (("fp32", work / "model"), ("int4 g128", work / "rtn-4-g128")):
            copying = work / (name.replace(" ", "-") + "-copy")
            if not (copying / "manifest.json").is_file():
                export_onnx(ExportConfig(model=str(source), out=str(copying)), log=lambda m: None)
            lengths[name] = {"shared": step_at_lengths(folders[("gpt2-124m", name)], 2),
                             "copy": step_at_lengths(copying, 2)}

    bw = {t: statistics.median(v) for t, v in bandwidth.items()}
    rows = []
    for ((shape, name), t), xs in steps.items():
        step = statistics.median(xs)
        floor = bytes_per_token[(shape, name)] / bw[t]
        rows.append({"shape": shape, "variant": name, "threads": t, "tok_s": 1 / step, "step_ms": step * 1e3,
                     "mb_per_token": bytes_per_token[(shape, name)] / 1e6, "floor_fraction": floor / step,
                     "bits_per_parameter": bits_per_parameter(folders[(shape, name)], SHAPES[shape]),
                     "rounds_ms": [x * 1e3 for x in xs]})
    result = {"machine": machine_info(), "shapes": {k: SHAPES[k] for k in args.shapes}, "huge_pages": args.huge_pages,
              "bandwidth_gb_s": {t: b / 1e9 for t, b in bw.items()}, "rows": rows,
              "step_ms_at_length": {v: {k: {n: x * 1e3 for n, x in by_n.items()} for k, by_n in kinds.items()}
                                    for v, kinds in lengths.items()},
              "command": "python -m benchmarks.decode_bandwidth " + " ".join(sys.argv[1:])}
    write_results(args.out, result, to_markdown(result, args.rounds))


def to_markdown(result: dict, rounds: int) -> str:
    bw = result["bandwidth_gb_s"]
    lines = [
        "# CPU decode against the memory-bandwidth floor",
        "",
        f"Machine: {describe(result['machine'])}. Read bandwidth measured in the same run: {bw[1]:.1f} GB/s "
        f"(1 thread), {bw[2]:.1f} GB/s (2 threads)."
        + (f" Weights on transparent huge pages (`GLIBC_TUNABLES={HUGE_TUNABLE}`)." if result.get("huge_pages") else ""),
        f"Random weights; batch 1, greedy, a 16-token prompt, median decode step of 64 tokens; {rounds} rounds "
        "interleaving every shape, variant and thread count; every export with the shared KV cache. Floor = bytes "
        "a step reads (every weight, the embedding tables once per token row) / read bandwidth. Bits/param: the "
        "graph files on disk over the model's parameters (the tied matrix counted once). ORT rows: ONNX Runtime's "
        "own quantizers applied to the fp32 export.",
        f"Command: `{result['command']}`",
    ]
    for shape, dims in result["shapes"].items():
        lines += ["", f"## {shape}: {dims['n_layer']} x {dims['n_embd']}"
                  + (f", MLP {dims['n_inner']}" if dims.get("n_inner") else "") + f", vocab {dims['vocab_size']}", "",
                  "| variant | threads | MB read / token | bits/param | tok/s | step ms | % of floor |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for r in sorted(rows, key=lambda r: (r["threads"], -r["mb_per_token"], r["variant"])):
            lines.append(f"| {r['variant']} | {r['threads']} | {r['mb_per_token']:.1f} | {r['bits_per_parameter']:.2f} "
                         f"| {r['tok_s']:.1f} | {r['step_ms']:.2f} | {r['floor_fraction']:.0%} |")
    if result["step_ms_at_length"]:
        lines += ["", "Step time over one long generation (124M shape, 2 threads), median of 20 steps around each "
                  "length:", "", "| variant | KV cache | token 50 ms | token 1,000 ms | ratio |",
                  "| --- | --- | --- | --- | --- |"]
        for variant, kinds in result["step_ms_at_length"].items():
            for kind in ("shared", "copy"):
                a, b = kinds[kind][50], kinds[kind][1000]
                lines.append(f"| {variant} | {kind} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
