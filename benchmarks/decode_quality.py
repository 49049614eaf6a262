"""What each faster decode variant costs in quality: perplexity and KL beside the variant it replaces.

On a trained model (the default pipeline's teacher unless --model) this script quantizes with
round-to-nearest (int8 per channel; int4 g32 with an int4 and with an int8 LM head; embeddings
included), exports each in the variants `benchmarks/decode_bandwidth.py` times (copying or
shared KV cache, MatMulNBits or DynamicQuantizeMatMul for int8), and scores every export through
ONNX Runtime on the same validation windows: perplexity, and KL divergence of its next-token
distributions from the PyTorch fp32 model's. Each row names the variant it replaces and the
relative change of both numbers.

    python -m benchmarks.decode_quality --model runs/pipeline/teacher --data runs/pipeline/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_results
from compactgpt.machine import describe, machine_info

RESULTS = Path(__file__).parent / "results"
# quantization (bits, group, head bits) or None for fp32 -> the exports made of it:
# name -> (export settings, name of the variant it replaces or None)
QUANTS = {
    None: {"fp32 copy": ({}, None), "fp32 shared": ({"kv_cache": "shared"}, "fp32 copy")},
    (8, 0, 0): {"int8 MatMulNBits": ({}, None),
                "int8 DynamicQuantizeMatMul": ({"int8_kernel": "dynamic"}, "int8 MatMulNBits")},
    (4, 32, 0): {"int4 g32 copy": ({}, None), "int4 g32 shared": ({"kv_cache": "shared"}, "int4 g32 copy")},
    (4, 32, 8): {"int4 g32, int8 head": ({}, "int4 g32 copy")},
}


def exports(model: Path, work: Path, log) -> dict[str, tuple[Path, str | None]]:
    """name -> (export folder, the variant it replaces); reused when present."""
    from export import ExportConfig, export_onnx
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    out = {}
    for quant, variants in QUANTS.items():
        source = model
        if quant:
            bits, group, head = quant
            source = work / f"rtn-{bits}-g{group}-head{head or bits}"
            if not (source / "manifest.json").is_file():
                log(f"quantizing {source.name}")
                method = RTNConfig(bits=bits, group_size=group, include_embeddings=True, head_bits=head)
                quantize_folder(QuantizeConfig(model=str(model), out=str(source), method=method, progress=False),
                                log=log)
        for name, (settings, replaces) in variants.items():
            folder = work / name.replace(" ", "-").replace(",", "")
            if not (folder / "manifest.json").is_file():
                log(f"exporting {name}")
                export_onnx(ExportConfig(model=str(source), out=str(folder), **settings), log=lambda m: None)
            out[name] = (folder, replaces)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/pipeline/teacher"), help="trained float model folder")
    p.add_argument("--data", type=Path, default=Path("runs/pipeline/data"), help="prepared data (its val split)")
    p.add_argument("--tokens", type=int, default=32768, help="validation tokens scored")
    p.add_argument("--work", type=Path, default=Path("runs/decode_quality"), help="exports (reused when present)")
    p.add_argument("--out", type=Path, default=RESULTS / "decode_quality")
    args = p.parse_args()
    from compactgpt.artifacts import load_model
    from compactgpt.data import TokenShards
    from compactgpt.evaluation import compare_models, model_logits_fn
    from export import OnnxDecoder

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    reference = load_model(args.model).model
    val = TokenShards(args.data, "val")
    tokens = torch.from_numpy(np.concatenate(val.shards)[:args.tokens].astype(np.int64))
    window = reference.config.n_positions
    folders = exports(args.model, args.work, log)
    rows = {}
    for name, (folder, replaces) in folders.items():
        decoder = OnnxDecoder(folder, threads=2)
        r = compare_models(decoder.logits_fn(), model_logits_fn(reference), tokens, window, window // 2)
        rows[name] = {"variant": name, "replaces": replaces, "perplexity": r.perplexity,
                      "reference_perplexity": r.reference_perplexity, "kl_mean": r.kl_mean,
                      "top1_agreement": r.top1_agreement}
        log(f"{name}: perplexity {r.perplexity:.4f}, KL {r.kl_mean:.3e}")
    for row in rows.values():
        base = rows.get(row["replaces"])
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1 if base else None
        # fp32 exports sit at float rounding from PyTorch (KL ~4e-8): a ratio of two such numbers means nothing.
        row["kl_change"] = row["kl_mean"] / base["kl_mean"] - 1 if base and base["kl_mean"] > 1e-6 else None
    result = {"machine": machine_info(), "model": str(args.model), "tokens": int(tokens.numel()), "window": window,
              "rows": list(rows.values()),
              "command": "python -m benchmarks.decode_quality " + " ".join(sys.argv[1:])}
    write_results(args.out, result, to_markdown(result))


def to_markdown(result: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:+.2e}"  # noqa: E731
    lines = [
        "# Quality of each decode variant against the variant it replaces",
        "",
        f"Machine: {describe(result['machine'])}. Model: `{result['model']}` (PyTorch fp32 perplexity "
        f"{result['rows'][0]['reference_perplexity']:.4f}); {result['tokens']:,} validation tokens in windows of "
        f"{result['window']} with half-window stride, scored through ONNX Runtime. KL: mean KL divergence of the "
        "export's next-token distributions from the PyTorch fp32 model's, nats. Changes are relative to the "
        "replaced variant.",
        f"Command: `{result['command']}`",
        "",
        "| variant | replaces | perplexity | KL from fp32 | top-1 agreement | perplexity change | KL change |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['replaces'] or '-'} | {r['perplexity']:.4f} | {r['kl_mean']:.3e} | "
                     f"{r['top1_agreement']:.4f} | {fmt(r['perplexity_change'])} | {fmt(r['kl_change'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
