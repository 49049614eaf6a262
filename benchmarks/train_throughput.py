"""Training throughput: CompactGPT's GPT against transformers' GPT2LMHeadModel, same shape,
optimizer and batch, one full step each (forward, loss, backward, AdamW), interleaved so both
see the same machine state; medians reported, with MFU on a known GPU.

CompactGPT's step is the one `compactgpt pretrain` runs: the loss through
`compactgpt.training.lm_loss` (LM head and cross-entropy chunk by chunk, never the full float
logits). A third row runs CompactGPT's model with the full-logits loss, to show what the
chunked loss is worth on its own.

    python -m benchmarks.train_throughput                        # CPU shapes, fp32
    python -m benchmarks.train_throughput --device cuda --shapes gpt2-124m --compile   # bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compactgpt.device import resolve_device
from compactgpt.machine import describe, machine_info
from compactgpt.model import GPT, GPTConfig
from compactgpt.training import flops_per_token, gpu_peak_flops, lm_loss

SHAPES = {
    # name: (layers, width, heads, vocab, sequence, batch)
    "small": (4, 256, 4, 8192, 256, 16),  # the small preset on 2 CPU cores
    "6x384": (6, 384, 6, 8192, 256, 8),
    # GPT-2 124M with the vocabulary padded to a multiple of 64, as pretraining pads it.
    "gpt2-124m": (12, 768, 12, 50304, 1024, 16),
}
CPU_SHAPES = ("small", "6x384")


def make_steps(shape, device: torch.device, compile_models: bool, seed: int = 0):
    """One step function per contender: each runs forward + loss + backward + AdamW on the
    same batch and returns its wall time (CUDA synchronized)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    L, C, H, V, T, B = shape
    torch.manual_seed(seed)
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.roll(x, -1, dims=1)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def ours() -> torch.nn.Module:
        return GPT(GPTConfig(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H)).to(device)

    hf_config = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config._attn_implementation = "sdpa"  # PyTorch's fused attention, as CompactGPT uses
    hf = GPT2LMHeadModel(hf_config).to(device)

    def stepper(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if cuda else {}))
        run = torch.compile(model) if compile_models else model

        def step() -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast():
                loss = loss_of(run)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        return step

    return {
        "compactgpt": stepper(ours(), lambda m: lm_loss(m, (x, y))[0]),
        "transformers": stepper(hf, lambda m: m(input_ids=x, labels=x).loss),  # shifts labels itself
        "compactgpt, full logits": stepper(ours(), lambda m: F.cross_entropy(m(x).logits.float().flatten(0, 1), y.flatten())),
    }, B * T


def run(shapes: list[str], steps: int, warmup: int, device: torch.device, compile_models: bool,
        batch: int | None) -> dict:
    results = {}
    for name in shapes:
        shape = SHAPES[name][:5] + (batch or SHAPES[name][5],)
        fns, tokens = make_steps(shape, device, compile_models)
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {k: [] for k in fns}
        for _ in range(steps):
            for k, fn in fns.items():  # interleaved: one step each, in turn
                times[k].append(fn())
        medians = {k: statistics.median(v) for k, v in times.items()}
        L, C, H, V, T, B = shape
        per_token = flops_per_token(GPTConfig(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H), T)
        peak = gpu_peak_flops(device)
        tok_s = {k: tokens / v for k, v in medians.items()}
        results[name] = {
            "shape": dict(zip(("layers", "width", "heads", "vocab", "seq", "batch"), shape)),
            "tokens_per_step": tokens,
            "median_step_s": medians,
            "tokens_per_s": tok_s,
            "ratio_vs_transformers": {k: medians["transformers"] / v for k, v in medians.items()},
            "mfu": {k: v * per_token / peak for k, v in tok_s.items()} if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        print(name, json.dumps(results[name]["tokens_per_s"]), flush=True)
    return results


def to_markdown(results: dict, machine: dict, steps: int, device: torch.device, compiled: bool, command: str) -> str:
    precision = "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32, AdamW"
    lines = [
        "# Training throughput: CompactGPT vs transformers GPT2LMHeadModel",
        "",
        f"Machine: {describe(machine)}; device {device}; {machine['torch_threads']} CPU threads. {precision}, "
        f"dropout 0, {'both compiled, ' if compiled else ''}transformers with sdpa attention; median of {steps} "
        f"interleaved steps per model. Command: `{command}`.",
        "",
        "| shape | batch x seq | transformers tok/s | CompactGPT tok/s | ratio | CompactGPT, full-logits loss tok/s | ratio | MFU (CompactGPT / transformers) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        t, ratio, mfu = r["tokens_per_s"], r["ratio_vs_transformers"], r["mfu"]
        s = r["shape"]
        mfu_text = f"{mfu['compactgpt']:.1%} / {mfu['transformers']:.1%}" if mfu else "n/a (CPU)"
        lines.append(
            f"| {name} ({s['layers']}x{s['width']}, V={s['vocab']}) | {s['batch']} x {s['seq']} | "
            f"{t['transformers']:,.0f} | {t['compactgpt']:,.0f} | {ratio['compactgpt']:.2f}x | "
            f"{t['compactgpt, full logits']:,.0f} | {ratio['compactgpt, full logits']:.2f}x | {mfu_text} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--shapes", help=f"comma-separated among {', '.join(SHAPES)} "
                        f"(default: {','.join(CPU_SHAPES)} on a CPU, gpt2-124m on a GPU)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the shape's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per model (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per model first (default 3)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .json and .md results")
    parser.add_argument("--name", help="result file name (default train_throughput, or train_throughput_gpu on CUDA)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    shapes = args.shapes.split(",") if args.shapes else (list(CPU_SHAPES) if device.type == "cpu" else ["gpt2-124m"])
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose among {list(SHAPES)}")
    machine = machine_info()
    results = run(shapes, args.steps, args.warmup, device, args.compile, args.batch)
    name = args.name or ("train_throughput_gpu" if device.type == "cuda" else "train_throughput")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.train_throughput " + " ".join(
        f for f in (f"--device {args.device}" if args.device != "auto" else "", f"--shapes {args.shapes}" if args.shapes
                    else "", f"--batch {args.batch}" if args.batch else "", "--compile" if args.compile else "") if f)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "device": str(device), "steps": args.steps,
                                                  "compiled": args.compile, "results": results}, indent=2))
    md = to_markdown(results, machine, args.steps, device, args.compile, command.strip())
    (out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
