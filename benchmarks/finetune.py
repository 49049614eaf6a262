"""Finetuning the small teacher on real data: instruction tuning, SMS spam classification,
and LoRA against full finetuning.

    python -m benchmarks.finetune --teacher runs/small --runs instruct,classify,classify-lora \
        [--data-root ../shared/data] [--work runs/finetune-bench] [--out benchmarks/results]

Each run finetunes the teacher with `compactgpt.finetune.finetune` (the same code as the CLI)
and records its held-out figures. Runs can be made one at a time (a few minutes each on two
CPU cores): results accumulate in OUT/finetune.json, and OUT/finetune.md is rebuilt from all
runs recorded so far, each with the exact command that produced it.

- instruct: Alpaca-style instruction data, 10% held out; held-out response perplexity before
  and after, and greedy answers to held-out prompts.
- classify / classify-lora: the SMS Spam Collection, stratified 20% held out; accuracy,
  macro F1, confusion matrix, the majority-class baseline; full finetuning against rank-8
  LoRA (adapters on every attention and MLP projection, the head trained in full).
- instruct-lora: instruction tuning with rank-8 LoRA, for the same comparison.
- lm: continued pretraining on English Wikipedia text (WikiText-2), 10% held out; domain
  perplexity before and after, and perplexity on the teacher's own held-out text (what is kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from compactgpt.finetune import FinetuneConfig, finetune, format_confusion
from compactgpt.machine import describe, machine_info

# name -> (data file under the data root, FinetuneConfig settings)
RUNS = {
    "instruct": ("instruction/instruction-data.json",
                 dict(task="instruct", template="alpaca", val_fraction=0.1, max_steps=300, batch_size=16,
                      lr=3e-4, warmup_steps=20, eval_interval=100, eval_samples=3, sample_tokens=48)),
    "instruct-lora": ("instruction/instruction-data.json",
                      dict(task="instruct", template="alpaca", val_fraction=0.1, max_steps=300, batch_size=16,
                           lr=5e-3, warmup_steps=20, eval_interval=100, eval_samples=3, sample_tokens=48,
                           lora_rank=8, lora_alpha=16.0)),
    "lm": ("wikitext-2-raw/wiki.test.hf-joined.txt",
           dict(task="lm", val_fraction=0.1, max_length=256, max_steps=100, batch_size=8, lr=3e-4,
                warmup_steps=10, eval_interval=50, eval_max_tokens=131072)),
    "classify": ("sms-spam/SMSSpamCollection",
                 dict(task="classify", val_fraction=0.2, max_length=128, max_steps=400, batch_size=32,
                      lr=3e-4, warmup_steps=20, eval_interval=100)),
    "classify-lora": ("sms-spam/SMSSpamCollection",
                      dict(task="classify", val_fraction=0.2, max_length=128, max_steps=400, batch_size=32,
                           lr=2e-3, warmup_steps=20, eval_interval=100, lora_rank=8, lora_alpha=16.0)),
}


def run_one(name: str, teacher: Path, data_root: Path, work: Path, seed: int,
            max_steps: int | None = None) -> dict | None:
    rel, settings = RUNS[name]
    if max_steps is not None:  # smoke runs only; the recorded command shows it
        settings = {**settings, "max_steps": max_steps, "eval_interval": max_steps}
    data = data_root / rel
    if not data.is_file():
        print(f"skipping {name}: {data} is absent", file=sys.stderr)
        return None
    config = FinetuneConfig(model=str(teacher), data=str(data), out=str(work / name), seed=seed, device="cpu",
                            **settings)
    t0 = time.perf_counter()
    finetune(config.replace(overwrite=True), log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    manifest = json.loads((work / name / "manifest.json").read_text())
    return {"settings": {k: v for k, v in config.to_dict().items() if k not in ("model", "data", "out")},
            "data": str(data), "metrics": manifest["metrics"], "samples": manifest["extra"].get("samples"),
            "wall_seconds": round(wall, 1)}


def fmt(v, digits=4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def run_table(runs: dict, names: tuple[str, ...], columns: str, cells) -> list[str]:
    """A markdown table with one row per run present: its name, trainable parameters, the
    `columns` (" | "-separated) filled by `cells(metrics)`, and training seconds."""
    n = columns.count("|") + 1
    lines = [f"| run | trainable params | {columns} | train s |", "| --- | ---: |" + " ---: |" * (n + 1)]
    for name in names:
        if name in runs:
            m = runs[name]["metrics"]
            lines.append(f"| {name} | {m['trainable_parameters']:,} ({100 * m['trainable_fraction']:.2f}%) | "
                         + " | ".join(cells(m)) + f" | {m['train_seconds']} |")
    return lines


def render(record: dict) -> str:
    lines = ["# Finetuning the small teacher", ""]
    params = record.get("teacher_parameters")
    params = f"{params:,}" if isinstance(params, int) else "?"  # a teacher's manifest may not count them
    lines += [f"Teacher: `{record['teacher']}` ({params} parameters). "
              f"Machine: {record['machine_text']}.", ""]
    runs = record["runs"]
    if "instruct" in runs or "instruct-lora" in runs:
        lines += ["## Instruction tuning (held-out response perplexity, lower is better)", ""]
        lines += run_table(runs, ("instruct", "instruct-lora"),
                           "before ppl | after ppl | before loss | after loss | held-out examples",
                           lambda m: [fmt(m['before_val_response_ppl'], 2), fmt(m['val_response_ppl'], 2),
                                      fmt(m['before_val_response_loss']), fmt(m['val_response_loss']),
                                      str(m.get('val_examples', '-'))])
        lines.append("")
    if "lm" in runs:
        m = runs["lm"]["metrics"]
        lines += ["## Domain adaptation (continued pretraining, perplexity, lower is better)", "",
                  "| held-out text | before | after |", "| --- | ---: | ---: |",
                  f"| domain ({runs['lm']['data']}, {m['domain_val_tokens']:,} tokens) | "
                  f"{fmt(m['before_domain_val_ppl'], 2)} | {fmt(m['domain_val_ppl'], 2)} |"]
        if "general_val_ppl" in m:
            lines.append(f"| teacher's own validation text ({m['general_val_tokens']:,} tokens) | "
                         f"{fmt(m['before_general_val_ppl'], 2)} | {fmt(m['general_val_ppl'], 2)} |")
        lines += ["", f"{m['steps']} steps, {m['train_tokens']:,} tokens, {m['train_seconds']} s.", ""]
    if "classify" in runs or "classify-lora" in runs:
        lines += ["## SMS spam classification (stratified held-out split)", ""]
        lines += run_table(runs, ("classify", "classify-lora"),
                           "accuracy | macro F1 | spam recall | spam precision | majority baseline",
                           lambda m: [fmt(m['val_accuracy']), fmt(m['val_macro_f1']), fmt(m.get('val_recall_spam')),
                                      fmt(m.get('val_precision_spam')), fmt(m['majority_baseline_accuracy'])])
        if "classify" in runs and "classify-lora" in runs:
            gap = 100 * (runs["classify"]["metrics"]["val_accuracy"] - runs["classify-lora"]["metrics"]["val_accuracy"])
            side = "below" if gap >= 0 else "above"
            lora_m = runs["classify-lora"]["metrics"]
            lines += ["", f"LoRA (rank {runs['classify-lora']['settings']['lora_rank']}, "
                          f"{100 * lora_m['trainable_fraction']:.2f}% of the parameters trainable) is "
                          f"{abs(gap):.2f} points {side} full finetuning's held-out accuracy."]
        for name in ("classify", "classify-lora"):
            if name in runs:
                lines += ["", f"Confusion matrix, {name} (rows true, columns predicted):", "", "```",
                          format_confusion(runs[name]["metrics"]["confusion"]), "```"]
        lines.append("")
    for name in ("instruct", "instruct-lora"):
        if name in runs and runs[name].get("samples"):
            lines += [f"## Sample answers to held-out prompts ({name}, greedy)", ""]
            for s in runs[name]["samples"]:
                lines += [f"- **Instruction:** {s['instruction']!r}" + (f" **Input:** {s['input']!r}" if s["input"] else ""),
                          f"  - reference: {s['reference']!r}", f"  - before: {s.get('before')!r}",
                          f"  - after: {s.get('after')!r}"]
            lines.append("")
    lines += ["## Commands", ""]
    for name, r in runs.items():
        lines.append(f"- {name}: `{r['command']}` ({r['wall_seconds']} s wall, recorded {r['when']})")
    lines += ["", "Settings of every run are in finetune.json next to this file."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model folder (e.g. runs/small)")
    ap.add_argument("--runs", default="instruct,classify,classify-lora", help=f"comma-separated, of {list(RUNS)}")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--work", default="runs/finetune-bench", help="where the finetuned artifacts go")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--max-steps", type=int, help="override every run's steps (smoke runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    teacher = Path(args.teacher)
    if not (teacher / "manifest.json").is_file():
        print(f"skipping: the teacher {teacher} is not ready (no manifest.json)", file=sys.stderr)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "finetune.json"
    record = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}}
    info = machine_info()
    teacher_manifest = json.loads((teacher / "manifest.json").read_text())
    record.update({"teacher": str(teacher), "teacher_parameters": teacher_manifest["metrics"].get("parameters"),
                   "machine": info, "machine_text": describe(info)})
    command = "python -m benchmarks.finetune " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name in names:
        result = run_one(name, teacher, Path(args.data_root), Path(args.work), args.seed, args.max_steps)
        if result is None:
            continue
        result["command"] = command
        result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record["runs"][name] = result
        json_path.write_text(json.dumps(record, indent=2))
        (out / "finetune.md").write_text(render(record))
        print(f"{name}: recorded in {json_path}", file=sys.stderr)
    print((out / "finetune.md").read_text() if (out / "finetune.md").is_file() else "nothing recorded")


if __name__ == "__main__":
    main()
