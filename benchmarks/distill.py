"""Students side by side: same shape, same token budget, three ways to make them.

    (a) random init, cross-entropy on the data (training from scratch; the teacher is not run)
    (b) random init, distillation from the teacher
    (c) pruned from the teacher (compactgpt prune), then distillation

The budget is a fraction of the tokens the teacher was trained on (its manifest's
train_tokens); every arm trains for the same number of steps of the same batches. Perplexity
is the sliding-window perplexity of the whole validation split (windows of n_positions,
stride n_positions / 2), the teacher's measured the same way on the same tokens.

    python -m benchmarks.distill --name stdlib --teacher runs/small --data runs/small/data --prune mlp=248

Each run adds its corpus to benchmarks/results/distill.json (arms run separately are merged)
and rewrites distill.md from it, with the exact command of every arm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from compactgpt.artifacts import read_manifest
from compactgpt.machine import describe, machine_info
from distill import DistillConfig, PruneConfig, SparsifyConfig, distill, prune, sparsify

ARMS = {
    "a": "random init + cross-entropy (from scratch)",
    "b": "random init + distillation",
    "c": "pruned from the teacher + distillation",
}


def parse_prune(spec: str) -> dict:
    out = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        if k not in ("layers", "heads", "embd", "mlp"):
            raise SystemExit(f"--prune: {k!r} is not one of layers, heads, embd, mlp")
        out[k] = int(v)
    return out


def shape_spec(cfg: dict) -> str:
    return ",".join(f"{k}={cfg[k]}" for k in ("n_layer", "n_head", "n_embd", "n_inner"))


def run_corpus(args) -> dict:
    teacher_m = read_manifest(args.teacher)
    teacher_tokens = teacher_m.metrics["train_tokens"]
    tokens_per_step = args.batch_size * args.block_size
    steps = int(args.budget * teacher_tokens // tokens_per_step)
    work = Path(args.work) / args.name
    log = lambda m: print(m, file=sys.stderr)
    pruned = work / "pruned"
    record: dict = {}
    prune_cfg = PruneConfig(model=args.teacher, out=str(pruned), data=args.data, calib_samples=args.calib_samples,
                            depth_metric=args.depth_metric, **parse_prune(args.prune))
    t0 = time.perf_counter()
    prune(prune_cfg.replace(progress=False), log=log)
    record["prune_seconds"] = round(time.perf_counter() - t0, 1)
    pm = read_manifest(pruned)
    record["pruned_only"] = {k: pm.metrics[k] for k in ("val_perplexity", "teacher_val_perplexity", "perplexity_delta",
                                                       "parameters", "non_embedding_parameters", "non_embedding_ratio")}
    record["pruning_plan"] = {"layers": pm.extra["pruning_plan"]["layers"], "shape": pm.extra["pruning_plan"]["shape"]}
    student_shape = shape_spec(json.loads((pruned / "config.json").read_text()))
    common = dict(teacher=args.teacher, data=args.data, block_size=args.block_size, batch_size=args.batch_size,
                  max_steps=steps, warmup_steps=args.warmup, eval_interval=max(steps, 1),
                  checkpoint_interval=max(steps, 1), log_interval=10, seed=args.seed, eval_batches=20,
                  temperature=args.temperature)
    arms = {
        "a": dict(student=student_shape, kd_weight=0.0, ce_weight=1.0, lr=args.lr_scratch, min_lr=args.lr_scratch / 10),
        "b": dict(student=student_shape, kd_weight=1.0, ce_weight=args.ce_weight, lr=args.lr_scratch,
                  min_lr=args.lr_scratch / 10),
        "c": dict(student=str(pruned), kd_weight=1.0, ce_weight=args.ce_weight, lr=args.lr_pruned,
                  min_lr=args.lr_pruned / 10),
    }
    record["arms"] = {}
    for arm in args.arms.split(","):
        cfg = DistillConfig(out=str(work / arm), **common, **arms[arm])
        t0 = time.perf_counter()
        distill(cfg.replace(progress=False, overwrite=True), log=log)
        wall = time.perf_counter() - t0
        m = read_manifest(work / arm).metrics
        record["arms"][arm] = {
            "description": ARMS[arm], "student": cfg.student if arm != "c" else f"pruned: {args.prune}",
            "kd_weight": cfg.kd_weight, "ce_weight": cfg.ce_weight, "temperature": cfg.temperature, "lr": cfg.lr,
            "steps": m["steps"], "train_tokens": m["train_tokens"], "token_fraction_of_teacher": m["token_fraction_of_teacher"],
            "val_perplexity": m["val_perplexity"], "teacher_val_perplexity": m["teacher_val_perplexity"],
            "perplexity_delta": m["perplexity_delta"], "parameters": m["parameters"],
            "non_embedding_parameters": m["non_embedding_parameters"], "non_embedding_ratio": m["non_embedding_ratio"],
            "parameter_ratio": m["parameter_ratio"], "wall_seconds": round(wall, 1),
            "train_tokens_per_s": m["tokens_per_s"],
        }
        log(f"[{args.name}] ({arm}) {ARMS[arm]}: perplexity {m['val_perplexity']:.2f} "
            f"(teacher {m['teacher_val_perplexity']:.2f}, {m['perplexity_delta']:+.1%})")
    record["teacher"] = {"path": args.teacher, "train_tokens": teacher_tokens,
                         "val_perplexity": record["pruned_only"]["teacher_val_perplexity"],
                         "non_embedding_parameters": teacher_m.metrics.get("non_embedding_parameters"),
                         "parameters": teacher_m.metrics.get("parameters"),
                         "data": teacher_m.settings.get("data")}
    record["settings"] = {"budget": args.budget, "steps": steps, "batch_size": args.batch_size,
                          "block_size": args.block_size, "prune": args.prune, "depth_metric": args.depth_metric,
                          "temperature": args.temperature, "ce_weight_in_kd_arms": args.ce_weight,
                          "calib_samples": args.calib_samples, "seed": args.seed}
    return record


SPARSITY_RUNS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("magnitude", "2:4"), ("wanda", "2:4")]


def run_sparsity(args) -> dict:
    """50% sparsity of the block projections by each method and pattern, then KD recovery of
    Wanda 2:4 with its mask held, at the same token budget as the students."""
    teacher_m = read_manifest(args.teacher)
    steps = int(args.budget * teacher_m.metrics["train_tokens"] // (args.batch_size * args.block_size))
    work = Path(args.work) / (args.name + "-sparsity")
    log = lambda m: print(m, file=sys.stderr)
    rows = []
    for method, pattern in SPARSITY_RUNS:
        out = work / f"{method}-{pattern.replace(':', 'of')}"
        sparsify(SparsifyConfig(model=args.teacher, out=str(out), data=args.data, method=method, pattern=pattern,
                                sparsity=0.5, calib_samples=args.calib_samples, progress=False), log=log)
        m = read_manifest(out).metrics
        rows.append({"method": method, "pattern": pattern, "sparsity": m["sparsity"], "val_perplexity": m["val_perplexity"],
                     "dense_val_perplexity": m["dense_val_perplexity"], "perplexity_delta": m["perplexity_delta"]})
    recovered = work / "wanda-2of4-kd"
    cfg = DistillConfig(teacher=args.teacher, student=str(work / "wanda-2of4"), data=args.data, out=str(recovered),
                        block_size=args.block_size, batch_size=args.batch_size, max_steps=steps, warmup_steps=args.warmup,
                        eval_interval=steps, checkpoint_interval=steps, eval_batches=20, lr=args.lr_pruned,
                        min_lr=args.lr_pruned / 10, seed=args.seed, temperature=args.temperature)
    distill(cfg.replace(progress=False, overwrite=True), log=log)
    m = read_manifest(recovered).metrics
    rows.append({"method": "wanda", "pattern": "2:4", "recovery": f"KD, {m['train_tokens']:,} tokens "
                 f"({m['token_fraction_of_teacher']:.0%} of the teacher's), mask held", "sparsity": m["sparsity"],
                 "val_perplexity": m["val_perplexity"], "dense_val_perplexity": m["teacher_val_perplexity"],
                 "perplexity_delta": m["perplexity_delta"]})
    return {"rows": rows, "teacher": args.teacher, "steps": steps}


def fmt_ratio(x: float) -> str:
    return f"{x:.1%}"


def render(results: dict) -> str:
    lines = ["# Students: from scratch vs distilled vs pruned + distilled", "",
             "Same student shape and the same token budget in every arm of a corpus. Perplexity: sliding window "
             "over the whole validation split (windows of n_positions, stride n_positions / 2); the teacher is "
             "measured on the same tokens. Parameters exclude nothing unless marked non-embedding.", "",
             f"Machine: {results['machine_text']}", ""]
    for name, r in results["corpora"].items():
        t = r["teacher"]
        s = r["settings"]
        lines += [f"## {name}", "",
                  f"Teacher `{t['path']}` (data: {t['data']}): {t['parameters']:,} parameters, "
                  f"{t['non_embedding_parameters']:,} non-embedding, trained on {t['train_tokens']:,} tokens; "
                  f"validation perplexity **{t['val_perplexity']:.2f}**.", "",
                  f"Budget: {s['budget']:.0%} of the teacher's tokens = {s['steps']} steps x {s['batch_size']} x "
                  f"{s['block_size']} tokens. Pruning: `{s['prune']}` (depth metric {s['depth_metric']}, "
                  # results written before the rename name it calib_windows
                  f"{s.get('calib_samples', s.get('calib_windows'))} calibration windows); "
                  f"KD arms: forward KL at T={s['temperature']}, "
                  f"CE weight {s['ce_weight_in_kd_arms']}.", "",
                  "| arm | student | loss | lr | tokens (share of teacher's) | params (non-emb, share of teacher's) "
                  "| val ppl | vs teacher | vs (a) |", "|---|---|---|---|---|---|---|---|---|"]
        po = r["pruned_only"]
        lines.append(f"| (c) before training | pruned `{s['prune']}` | – | – | 0 | {po['parameters']:,} "
                     f"({po['non_embedding_parameters']:,}, {fmt_ratio(po['non_embedding_ratio'])}) | "
                     f"{po['val_perplexity']:.2f} | {po['perplexity_delta']:+.1%} | |")
        a_ppl = r["arms"].get("a", {}).get("val_perplexity")
        for arm in ("a", "b", "c"):
            if arm not in r["arms"]:
                continue
            x = r["arms"][arm]
            loss = "CE" if x["kd_weight"] == 0 else f"KD{' + %.2g CE' % x['ce_weight'] if x['ce_weight'] else ''}"
            vs_a = f"{x['val_perplexity'] / a_ppl - 1:+.1%}" if a_ppl and arm != "a" else ""
            lines.append(f"| ({arm}) {x['description']} | `{x['student']}` | {loss} | {x['lr']:g} | "
                         f"{x['train_tokens']:,} ({fmt_ratio(x['token_fraction_of_teacher'])}) | {x['parameters']:,} "
                         f"({x['non_embedding_parameters']:,}, {fmt_ratio(x['non_embedding_ratio'])}) | "
                         f"{x['val_perplexity']:.2f} | {x['perplexity_delta']:+.1%} | {vs_a} |")
        lines += ["", "Commands:", ""]
        if r.get("teacher_command"):
            lines.append(f"- teacher: `{r['teacher_command']}`")
        for arms, cmd in r["commands"].items():
            lines.append(f"- arms {arms}: `{cmd}`")
        lines.append("")
    for name, r in results.get("sparsity", {}).items():
        lines += [f"## Sparsity: {name} (teacher `{r['teacher']}`)", "",
                  "Block projections only (embeddings and the tied head stay dense). No speed-up on this CPU: its dense "
                  "kernels multiply zeros like any other number; 2:4 is the pattern NVIDIA Ampere+ sparse tensor cores "
                  "run faster.", "",
                  "| method | pattern | recovery | sparsity | val ppl | dense ppl | delta |", "|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['method']} | {x['pattern']} | {x.get('recovery', 'none (one shot)')} | {x['sparsity']:.1%} | "
                         f"{x['val_perplexity']:.2f} | {x['dense_val_perplexity']:.2f} | {x['perplexity_delta']:+.1%} |")
        lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="stdlib", help="corpus name in the results (e.g. stdlib, tinyshakespeare)")
    p.add_argument("--teacher", help="teacher model folder (students and sparsity modes)")
    p.add_argument("--data", help="the teacher's prepared data folder (students and sparsity modes)")
    p.add_argument("--prune", default="mlp=248", help="pruning targets for (c), e.g. mlp=248 or heads=3,mlp=632")
    p.add_argument("--arms", default="a,b,c", help="arms to run now (others are kept from earlier runs)")
    p.add_argument("--budget", type=float, default=0.1, help="share of the teacher's training tokens per arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr-scratch", type=float, default=2e-3, help="peak lr of (a) and (b)")
    p.add_argument("--lr-pruned", type=float, default=1e-3, help="peak lr of (c)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy weight in the KD arms")
    p.add_argument("--depth-metric", default="loss")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows of pruning and Wanda")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/bench_distill", help="where the students are written")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--mode", choices=("students", "sparsity", "render"), default="students",
                   help="students: arms (a)-(c); sparsity: magnitude/Wanda x unstructured/2:4, then KD recovery; "
                        "render: rewrite distill.md from distill.json (recording --teacher-command for --name)")
    p.add_argument("--teacher-command", help="the command that trained the teacher, recorded in the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "distill.json"
    results = json.loads(path.read_text()) if path.is_file() else {"corpora": {}}
    command = "python -m benchmarks.distill " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.mode != "render" and not (args.teacher and args.data):
        p.error("--teacher and --data are required in the students and sparsity modes")
    if args.mode == "render":
        if args.teacher_command:
            results["corpora"][args.name]["teacher_command"] = args.teacher_command
        _write(results, out, path, keep_machine=True)
        return
    if args.mode == "sparsity":
        record = run_sparsity(args)
        record["command"] = command
        results.setdefault("sparsity", {})[args.name] = record
        _write(results, out, path)
        return
    record = run_corpus(args)
    record["teacher_command"] = args.teacher_command or results["corpora"].get(args.name, {}).get("teacher_command")
    prev = results["corpora"].get(args.name, {})
    same = prev.get("settings") == record["settings"]
    if same:  # arms run separately with the same settings are merged
        record["arms"] = {**prev.get("arms", {}), **record["arms"]}
        record["commands"] = {k: v for k, v in prev.get("commands", {}).items() if k != args.arms}
    else:
        record["commands"] = {}
    record["commands"][args.arms] = command
    results["corpora"][args.name] = record
    _write(results, out, path)


def _write(results: dict, out: Path, path: Path, keep_machine: bool = False) -> None:
    if not keep_machine:
        info = machine_info()
        results["machine"] = info
        results["machine_text"] = describe(info)
    path.write_text(json.dumps(results, indent=2))
    (out / "distill.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
