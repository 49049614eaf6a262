"""Soak test of the ONNX runtime: one generation of 10,000 tokens, memory and step time over it.

A tiny random-weight GPT with 10,240 positions is exported (fp32, fused graph) and run by
`export.OnnxDecoder.stream`, batch 1, greedy, once per KV-cache path:

* before: the runtime as it was before `KVCache`: ONNX Runtime allocates a new present KV
  every step, one token longer, with its memory pattern on (`preallocate=False,
  memory_pattern=True`)
* per-step: the same with the memory pattern off (`preallocate=False`), to separate the two causes
* preallocated: the default, `KVCache`: two buffers per KV tensor allocated once, bound by IO
  binding, memory pattern off
* shared: the export with `--kv-cache shared` (GroupQueryAttention): one buffer per KV tensor
  bound as both past and present, the new keys and values written into it in place

Each path runs in its own process, so one path's freed memory cannot flatter the other's
figures. Every 500 tokens the process's resident memory (VmRSS from /proc/self/status) and the
median step time of the last 500 steps are recorded, against the KV cache's own size at that
length. Also measured: the sha256 check `OnnxDecoder` runs on every open (`export.verify`), on
this export with its weights in model.onnx.data, as a rate that extrapolates to larger files.

    python -m benchmarks.onnx_soak --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compactgpt.machine import describe, machine_info

SHAPE = dict(vocab_size=320, n_positions=10240, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
# path -> OnnxDecoder keywords
PATHS = {"before": dict(preallocate=False, memory_pattern=True), "per-step": dict(preallocate=False),
         "preallocated": dict(preallocate=True), "shared": dict(preallocate=True)}
# path -> the export it runs: "shared" is the --kv-cache shared graph, the others the copying one
EXPORTS = {"before": "copy", "per-step": "copy", "preallocated": "copy", "shared": "shared"}


def rss_kib() -> int:
    """This process's resident memory in KiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def kv_bytes_per_token(shape: dict, itemsize: int = 4) -> int:
    """Bytes one cached token takes: keys and values of every layer, batch 1."""
    return shape["n_layer"] * 2 * shape["n_embd"] * itemsize


def export_soak_model(work: Path, threads: int) -> dict[str, Path]:
    """Save a random-weight GPT of SHAPE with a small tokenizer and export it (weights external),
    with each KV cache layout: {"copy": folder, "shared": folder}."""
    from compactgpt.artifacts import save_model
    from compactgpt.model import GPT, GPTConfig
    from compactgpt.tokenizer import train_bpe
    from export import ExportConfig, export_onnx

    torch.manual_seed(0)
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n", "hello world\n"] * 50, vocab_size=300)
    save_model(work / "model", GPT(GPTConfig(**SHAPE)).eval(), tokenizer, stage="pretrain", settings={})
    return {kv: export_onnx(ExportConfig(model=str(work / "model"), out=str(work / f"onnx-{kv}"), kv_cache=kv,
                                         external_data="always", threads=threads), log=lambda m: None)
            for kv in ("copy", "shared")}


def soak(folder: str, path: str, threads: int, new_tokens: int, prompt_len: int, every: int) -> dict:
    """One path, in this process: samples every `every` tokens, and the tokens' checksum."""
    from export import OnnxDecoder

    torch.set_num_threads(1)
    decoder = OnnxDecoder(folder, threads=threads, verify=False, **PATHS[path])
    prompt = torch.randint(0, 300, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    for _ in decoder.stream(prompt, 64):  # warm-up: kernels and arena for short lengths
        pass
    baseline = rss_kib()
    samples, steps, tokens = [], [], []
    start = last = time.perf_counter()
    for i, token in enumerate(decoder.stream(prompt, new_tokens), start=1):
        now = time.perf_counter()
        steps.append(now - last)
        last = now
        tokens.append(int(token[0]))
        if i % every == 0:
            median = statistics.median(steps[-every:])
            samples.append({"tokens": i, "rss_mib": rss_kib() / 1024, "rss_growth_mib": (rss_kib() - baseline) / 1024,
                            "kv_cache_mib": (prompt_len + i) * kv_bytes_per_token(SHAPE) / 2**20,
                            "step_ms": median * 1e3, "tokens_per_s": 1 / median})
    return {"baseline_rss_mib": baseline / 1024, "seconds": time.perf_counter() - start, "samples": samples,
            "tokens_checksum": hashlib.sha256(str(tokens).encode()).hexdigest()[:16], "tokens": len(tokens)}


def time_verify(folder: Path, repeats: int = 3) -> dict:
    """Median seconds of the sha256 check of every manifest file, and the bytes it reads."""
    from compactgpt.artifacts import read_manifest
    from export.verify import verify_export_files

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        verify_export_files(folder)
        times.append(time.perf_counter() - t)
    nbytes = sum((folder / name).stat().st_size for name in read_manifest(folder).files)
    median = statistics.median(times)
    return {"seconds": median, "bytes": nbytes, "mib_per_s": nbytes / 2**20 / median}


def to_markdown(result: dict) -> str:
    a = result["shape"]
    lines = [
        "# ONNX runtime soak: 10,000 tokens in one generation",
        "",
        f"Machine: {describe(result['machine'])}. ONNX Runtime CPU provider, {result['threads']} threads, batch 1, "
        f"greedy, a {result['prompt_len']}-token random prompt then {result['new_tokens']} new tokens in one "
        f"`OnnxDecoder.stream` call; each path in its own process after a 64-token warm-up.",
        f"Model: random-weight GPT, n_layer {a['n_layer']}, n_embd {a['n_embd']}, n_head {a['n_head']}, vocab "
        f"{a['vocab_size']}, n_positions {a['n_positions']}, fp32 fused graph. KV cache: "
        f"{result['kv_bytes_per_token']} bytes per token.",
        f"Command: `{result['command']}`",
        "",
        "Memory growth is VmRSS minus its value after the warm-up; step time is the median of the last "
        f"{result['every']} steps.",
        "",
        "| tokens | KV cache MiB | " + " | ".join(f"{p}: RSS growth MiB | {p}: ms/step" for p in PATHS) + " |",
        "| ---: | ---: |" + " ---: | ---: |" * len(PATHS),
    ]
    runs = [result["paths"][p]["samples"] for p in PATHS]
    for row in zip(*runs):
        cells = " | ".join(f"{r['rss_growth_mib']:.1f} | {r['step_ms']:.3f}" for r in row)
        lines.append(f"| {row[0]['tokens']} | {row[0]['kv_cache_mib']:.1f} | {cells} |")
    s, v = result["summary"], result["verify"]
    lines += ["", f"- Tokens identical on every path: {s['same_tokens']}."]
    for p in PATHS:
        tps = s[f"{p}_tps"]
        samples = result["paths"][p]["samples"]
        during = samples[-1]["rss_growth_mib"] - samples[0]["rss_growth_mib"]
        lines.append(f"- {p}: RSS growth {s[f'{p}_growth_kib_per_token']:.2f} KiB/token over the run, of which "
                     f"{during:.1f} MiB between the first and the last sample; decode {tps[0]:.0f} -> "
                     f"{tps[1]:.0f} tokens/s (first -> last sample); whole generation "
                     f"{result['paths'][p]['seconds']:.1f} s.")
    kv_total = samples[-1]["kv_cache_mib"]
    lines += [
        f"- The KV cache itself is {result['kv_bytes_per_token'] / 1024:.2f} KiB/token ({kv_total:.1f} MiB at the end); "
        "the preallocated path commits two buffers of it when the generation starts (past read from one, present "
        "written into the other), so its memory is flat from then on: what it grows while generating stays "
        "below the KV cache's own size. The shared path commits one buffer and copies nothing per step.",
        f"- Opening check (sha256 of every manifest file, {v['bytes'] / 2**20:.2f} MiB with model.onnx.data): "
        f"{v['seconds'] * 1e3:.1f} ms, {v['mib_per_s']:.0f} MiB/s on one core, so about "
        f"{500 / v['mib_per_s']:.1f} s for a 500 MB (GPT-2 124M fp32) export, once per open; "
        "`OnnxDecoder(verify=False)` skips it.",
    ]
    return "\n".join(lines) + "\n"


def summarize(paths: dict) -> dict:
    out = {"same_tokens": len({run["tokens_checksum"] for run in paths.values()}) == 1}
    for name, run in paths.items():
        first, last = run["samples"][0], run["samples"][-1]
        out[f"{name}_growth_kib_per_token"] = last["rss_growth_mib"] * 1024 / last["tokens"]
        out[f"{name}_tps"] = [first["tokens_per_s"], last["tokens_per_s"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=10_000)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results", help="folder for onnx_soak.{json,md}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one path in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(soak(args.folder, args.worker, args.threads, args.new_tokens, args.prompt_len,
                              args.every)))
        return
    if args.prompt_len + args.new_tokens > SHAPE["n_positions"]:
        parser.error(f"prompt + new tokens exceed the model's {SHAPE['n_positions']} positions")
    command = "python -m benchmarks.onnx_soak " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        folders = export_soak_model(Path(tmp), args.threads)
        verify = time_verify(folders["copy"])
        paths = {}
        for name in PATHS:
            cmd = [sys.executable, "-m", "benchmarks.onnx_soak", "--worker", name, "--folder", str(folders[EXPORTS[name]]),
                   "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                   "--prompt-len", str(args.prompt_len), "--every", str(args.every)]
            print(f"running {name} ...", file=sys.stderr)
            paths[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result = {"command": command, "machine": machine_info(), "shape": SHAPE, "threads": args.threads,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "every": args.every,
              "kv_bytes_per_token": kv_bytes_per_token(SHAPE), "verify": verify, "paths": paths,
              "summary": summarize(paths)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_soak.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (out / "onnx_soak.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
