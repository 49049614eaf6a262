"""Training tokens/s: CompactGPT's GPT vs transformers' GPT2LMHeadModel, side by side.

Same config (dropout 0), same AdamW, same batch, same threads. The two models take turns,
step by step, so that any drift in the machine's speed hits both equally; the figure is the
median step time over the measured steps. CompactGPT with torch.compile is a third column.

    python -m benchmarks.train_throughput [--steps 12] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compactgpt.machine import describe, machine_info
from compactgpt.model import GPT, GPTConfig

SHAPES = {
    # name: (layers, width, heads, vocab, sequence, batch)
    "small preset (4x256, V=8192)": (4, 256, 4, 8192, 256, 16),
    "6x384, V=8192": (6, 384, 6, 8192, 256, 8),
}


def make_steps(shape, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    L, C, H, V, T, B = shape
    torch.manual_seed(seed)
    x = torch.randint(0, V, (B, T))
    y = torch.roll(x, -1, dims=1)

    ours = GPT(GPTConfig(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H))
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    compiled_model = GPT(GPTConfig(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H))
    compiled = torch.compile(compiled_model)

    def stepper(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def step() -> float:
            t0 = time.perf_counter()
            loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        return step

    ours_loss = lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    # transformers shifts labels itself: labels=x scores the same next-token targets.
    hf_loss = lambda m: m(input_ids=x, labels=x).loss
    return {
        "compactgpt": stepper(ours, ours_loss),
        "transformers": stepper(hf, hf_loss),
        "compactgpt+compile": stepper(compiled, ours_loss),
    }, B * T


def run(steps: int, warmup: int) -> dict:
    results = {}
    for name, shape in SHAPES.items():
        fns, tokens = make_steps(shape)
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {k: [] for k in fns}
        for _ in range(steps):
            for k, fn in fns.items():  # interleaved: one step each, in turn
                times[k].append(fn())
        medians = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "tokens_per_step": tokens,
            "median_step_s": medians,
            "tokens_per_s": {k: tokens / v for k, v in medians.items()},
            "ratio_vs_transformers": {k: medians["transformers"] / v for k, v in medians.items()},
        }
        print(name, json.dumps(results[name]["tokens_per_s"]), flush=True)
    return results


def to_markdown(results: dict, machine: dict, steps: int) -> str:
    lines = [
        "# Training throughput: CompactGPT vs transformers GPT2LMHeadModel",
        "",
        f"Machine: {describe(machine)}; {machine['torch_threads']} threads. fp32, AdamW, dropout 0, "
        f"median of {steps} interleaved steps per model. Command: `python -m benchmarks.train_throughput`.",
        "",
        "| shape | batch x seq | transformers tok/s | CompactGPT tok/s | ratio | CompactGPT + torch.compile tok/s | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        t, ratio = r["tokens_per_s"], r["ratio_vs_transformers"]
        lines.append(
            f"| {name} | {r['tokens_per_step']} | {t['transformers']:,.0f} | {t['compactgpt']:,.0f} | "
            f"{ratio['compactgpt']:.2f}x | {t['compactgpt+compile']:,.0f} | {ratio['compactgpt+compile']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per model (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per model first (default 3)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for train_throughput.{json,md}")
    args = parser.parse_args()
    machine = machine_info()
    results = run(args.steps, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps({"machine": machine, "steps": args.steps,
                                                           "results": results}, indent=2))
    md = to_markdown(results, machine, args.steps)
    (out / "train_throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
