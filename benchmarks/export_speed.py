"""Decode speed of ONNX exports: tokens/s and time to first token, side by side.

Batch 1, greedy, a fixed random prompt, one generation run per backend after a short
warm-up run; decode tokens/s is 1 / the median step time of that run, time to first token
is prefill + the first pick. Backends, all on the same weights:

* PyTorch fp32 eager (CompactGPT's GPT.stream, the KV-cache loop)
* Optimum's ONNX export (optimum main_export, text-generation-with-past), run by the same
  ONNX Runtime loop as CompactGPT's graphs, so only the graph differs
* CompactGPT ONNX fp32 (fused graph)
* ONNX Runtime's dynamic int8 of the CompactGPT fp32 export (MatMulInteger baseline)
* CompactGPT ONNX int8 and int4: RTN weights from quantize/ (LM head included), MatMulNBits, and
  the int8 codes on DynamicQuantizeMatMul (export --int8-kernel dynamic)

Each figure is set against its bandwidth floor: the bytes of weights a decode step reads
(every initializer except tables only gathered from) divided by the machine's measured read
bandwidth (a 1 GiB float32 sum with the same thread count).

    python -m benchmarks.export_speed --model runs/small --shape gpt2-124m --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compactgpt.artifacts import load_model, save_model
from compactgpt.machine import describe, machine_info
from compactgpt.model import GPT, GPTConfig
from compactgpt.tokenizer import train_bpe

# The GPT-2 vocabulary padded to a multiple of 64 (as nanoGPT does): the int8/int4 GPTQ layout
# packs output rows four or eight to a 32-bit word, which 50257 rows do not fill.
SHAPES = {"gpt2-124m": GPTConfig(vocab_size=50304), "gpt2-6x384": GPTConfig(vocab_size=8192, n_layer=6, n_embd=384, n_head=6)}


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the better of a 1 GiB float32 sum and a 1 GiB float32
    matrix-vector product (what a decode step does), medians of `repeats`. One probe alone
    under-reads (measured: the sum gave 13.7 GB/s on one thread while ONNX Runtime's fp32 decode
    read 15.2, and 25.4 on two while fp32 decode read 26.8)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    w, v = x.view(-1, 4096), torch.ones(4096)

    def best(probe) -> float:
        probe()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            probe()
            times.append(time.perf_counter() - t)
        return x.numel() * 4 / statistics.median(times)

    return max(best(x.sum), best(lambda: torch.mv(w, v)))


def onnx_bytes_per_token(path: Path) -> int:
    """Initializer bytes a decode step reads: all but the tables used only by Gather."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, set()).add(node.op_type if i == 0 or node.op_type != "Gather" else "GatherIndex")
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name) == {"Gather"} and len(t.dims) == 2 and t.dims[0] > 64:
            continue  # an embedding table: one row per token is read
        total += int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def torch_bytes_per_token(model: GPT) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "transformer.wpe.weight")


def time_generation(stream, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(time to first token s, median decode step s, tokens) of one greedy run."""
    t0 = time.perf_counter()
    it = stream(prompt, new_tokens)
    first = next(it)
    ttft = time.perf_counter() - t0
    tokens, steps = [int(first[0])], []
    last = time.perf_counter()
    for tok in it:
        now = time.perf_counter()
        steps.append(now - last)
        last = now
        tokens.append(int(tok[0]))
    return ttft, statistics.median(steps), tokens


def prepare(source: Path, work: Path, threads: int, log) -> dict[str, dict]:
    """Export every backend's model into work/; returns name -> {stream, bytes, ...}."""
    from export import ExportConfig, OnnxDecoder, export_onnx
    from quantize import RTNConfig, quantize_, save_quantized

    loaded = load_model(source)
    model = loaded.model.eval()
    backends: dict[str, dict] = {}
    backends["PyTorch fp32 eager"] = {"stream": lambda p, n: model.stream(p, n), "bytes": torch_bytes_per_token(model)}

    optimum_dir = work / "optimum"
    if not (optimum_dir / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        log("exporting with Optimum")
        main_export(str(source), output=str(optimum_dir), task="text-generation-with-past", device="cpu",
                    do_validation=False)
    backends["Optimum ONNX fp32"] = {"folder": optimum_dir}

    def export(name: str, folder: Path, **settings):
        if not (folder / "manifest.json").is_file():
            log(f"exporting {name}")
            export_onnx(ExportConfig(out=str(folder), threads=threads, **settings), log=log)
        backends[name] = {"folder": folder}

    export("CompactGPT ONNX fp32", work / "fp32", model=str(source))
    export("ORT dynamic int8 of CompactGPT fp32", work / "ort-int8", model=str(source), ort_int8=True)
    for label, bits, group in (("int8", 8, 0), ("int4", 4, 128)):
        qdir = work / f"rtn-{label}"
        if not (qdir / "manifest.json").is_file():
            log(f"quantizing {label} (RTN, LM head included)")
            qmodel = load_model(source).model
            config = RTNConfig(bits=bits, group_size=group, include_embeddings=True)
            quantize_(qmodel, config)
            save_quantized(qdir, qmodel, loaded.tokenizer, config, parent=source)
        export(f"CompactGPT ONNX {label} (RTN, MatMulNBits)", work / f"onnx-{label}", model=str(qdir),
               accuracy_level=4)
        if bits == 8:  # the same per-channel codes on ONNX Runtime's DynamicQuantizeMatMul
            export("CompactGPT ONNX int8 (RTN, DynamicQuantizeMatMul)", work / "onnx-int8-dynamic", model=str(qdir),
                   int8_kernel="dynamic")
    for name, b in backends.items():
        if "folder" in b:
            decoder = OnnxDecoder(b["folder"], threads=threads)
            b["stream"] = lambda p, n, d=decoder: d.stream(p, n)
            b["bytes"] = onnx_bytes_per_token(b["folder"] / "model.onnx")
            b["file_mb"] = sum(f.stat().st_size for f in b["folder"].glob("model.onnx*")) / 1e6
    return backends


def run_model(label: str, source: Path, work: Path, threads: int, prompt_len: int, new_tokens: int,
              bandwidth: float, log, ppl_tokens: int = 0) -> dict:
    torch.set_num_threads(threads)
    backends = prepare(source, work, threads, log)
    config = load_model(source).model.config
    prompt = torch.randint(0, min(config.vocab_size, 8000), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    rows = {}
    reference = None
    for name, b in backends.items():
        time_generation(b["stream"], prompt, 8)  # warm-up: sessions allocate and pre-pack here
        ttft, step, tokens = time_generation(b["stream"], prompt, new_tokens)
        reference = reference or tokens
        floor_s = b["bytes"] / bandwidth
        rows[name] = {
            "decode_tok_s": 1.0 / step, "ttft_ms": ttft * 1e3, "weight_mb_per_token": b["bytes"] / 1e6,
            "floor_tok_s": 1.0 / floor_s, "share_of_floor": floor_s / step,
            "same_tokens_as_pytorch": tokens == reference, "file_mb": b.get("file_mb"),
        }
        log(f"{label} | {name}: {rows[name]['decode_tok_s']:.1f} tok/s, TTFT {rows[name]['ttft_ms']:.1f} ms, "
            f"{100 * rows[name]['share_of_floor']:.0f}% of floor")
    record = {"model": label, "source": str(source), "params": sum(p.numel() for p in load_model(source).model.parameters()),
              "results": rows}
    if ppl_tokens:
        record["perplexity"] = perplexities(source, backends, work, ppl_tokens, log)
    return record


def perplexities(source: Path, backends: dict, work: Path, n_tokens: int, log) -> dict | None:
    """Validation perplexity through every backend (PyTorch quantized models too), when the
    model records its data; None for random weights."""
    from compactgpt.errors import ConfigError
    from compactgpt.evaluation import model_logits_fn, perplexity
    from compactgpt.calibration import heldout_tokens
    from export import OnnxDecoder
    from quantize import load_quantized

    loaded = load_model(source)
    try:
        tokens, data = heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer)
    except ConfigError:
        return None
    # Named through the model folder as given, not the machine's absolute path of the data.
    data = f"{data.split(' of ')[0]} of the data {source} was trained on"
    tokens = tokens[:n_tokens]
    n_pos = loaded.model.config.n_positions
    out = {"data": data, "tokens": int(tokens.numel()), "max_length": n_pos, "stride": n_pos // 2, "ppl": {}}
    fns = {"PyTorch fp32 eager": model_logits_fn(loaded.model)}
    for label in ("int8", "int4"):
        fns[f"PyTorch {label} (RTN, dequantized weights)"] = model_logits_fn(load_quantized(work / f"rtn-{label}").model)
    for name, b in backends.items():
        if "folder" in b:
            fns[name] = OnnxDecoder(b["folder"], threads=torch.get_num_threads()).logits_fn()
    for name, fn in fns.items():
        out["ppl"][name] = perplexity(fn, tokens, n_pos, n_pos // 2).perplexity
        log(f"perplexity {name}: {out['ppl'][name]:.4f}")
    return out


def to_markdown(records: list[dict], machine: dict, args, command: str, bandwidth: float) -> str:
    lines = [
        "# ONNX decode speed: PyTorch, Optimum and CompactGPT exports",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {describe(machine)}. Batch 1, {args.threads} threads, greedy, a {args.prompt_len}-token random "
        f"prompt and {args.new_tokens} new tokens; one run per backend after a warm-up run. Decode tok/s = 1 / "
        "median step time; TTFT = prefill + first token. Measured read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s ({args.threads} threads); floor = weight bytes read per token / bandwidth "
        "(KV cache reads not counted). Optimum's graph runs in the same ONNX Runtime loop as CompactGPT's.",
        "",
    ]
    for rec in records:
        res = rec["results"]
        base = res.get("Optimum ONNX fp32", {}).get("decode_tok_s")
        lines += [f"## {rec['model']} ({rec['params'] / 1e6:.1f}M parameters)", "",
                  "| backend | decode tok/s | vs Optimum | TTFT ms | MB read / token | floor tok/s | % of floor | file MB | tokens = PyTorch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in res.items():
            ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
            file_mb = f"{r['file_mb']:.0f}" if r.get("file_mb") else "-"
            lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {ratio} | {r['ttft_ms']:.1f} | {r['weight_mb_per_token']:.0f} | "
                         f"{r['floor_tok_s']:.0f} | {100 * r['share_of_floor']:.0f}% | {file_mb} | "
                         f"{'yes' if r['same_tokens_as_pytorch'] else 'no'} |")
        lines.append("")
        ppl = rec.get("perplexity")
        if ppl:
            ref = ppl["ppl"]["PyTorch fp32 eager"]
            lines += [f"Perplexity on {ppl['tokens']:,} tokens of the {ppl['data']} (windows of {ppl['max_length']}, "
                      f"stride {ppl['stride']}):", "",
                      "| model | perplexity | relative to PyTorch fp32 |", "| --- | --- | --- |"]
            lines += [f"| {k} | {v:.4f} | {(v - ref) / ref:+.2e} |" for k, v in ppl["ppl"].items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="artifact folder to measure (repeatable)")
    parser.add_argument("--shape", action="append", default=[], choices=sorted(SHAPES),
                        help="also measure a random-weight model of this shape (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=32768,
                        help="validation tokens for the perplexity comparison (models that record their data; 0: off)")
    parser.add_argument("--work", default="runs/export_speed", help="folder for the exports (reused when present)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for export_speed.{json,md}")
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    command = "python -m benchmarks.export_speed " + " ".join(sys.argv[1:])
    work = Path(args.work)
    sources = [(Path(m).name, Path(m)) for m in args.model]
    for shape in args.shape:
        folder = work / shape / "model"
        if not (folder / "manifest.json").is_file():
            torch.manual_seed(0)
            tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
            save_model(folder, GPT(SHAPES[shape]), tok, stage="pretrain", settings={"random_shape": shape})
        sources.append((f"random {shape}", folder))
    bandwidth = read_bandwidth(args.threads)
    machine = machine_info()
    records = [run_model(label, src, work / label.replace(" ", "_"), args.threads, args.prompt_len,
                         args.new_tokens, bandwidth, log, args.ppl_tokens) for label, src in sources]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_speed.json").write_text(json.dumps({"command": command, "machine": machine,
                                                        "bandwidth_bytes_s": bandwidth, "settings": vars(args),
                                                        "records": records}, indent=2))
    md = to_markdown(records, machine, args, command, bandwidth)
    (out / "export_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
