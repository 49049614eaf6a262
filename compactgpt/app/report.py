"""The benchmark report: report.json, report.md and PNG plots, built from the artifacts'
manifests and the measurements alone (nothing is re-measured or re-trained here).

The baseline row (the teacher) anchors every ratio: x faster is decode tokens/s at the
first batch size over the baseline's, x smaller is the baseline's file bytes over the row's,
and the perplexity delta is relative to the baseline's perplexity on the same tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_text
from ..lineage import ancestors

# The headline student: the fastest whose perplexity is at most this far above the baseline's.
HEADLINE_PPL_TOLERANCE = 0.10
STUDENT_STAGES = ("distill", "prune")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (speed, perplexity) points no other point beats: faster-or-equal and
    lower-or-equal perplexity, strictly better in one. Sorted by speed, slowest first."""
    front = []
    for i, (s_i, p_i) in enumerate(points):
        dominated = any(
            s_j >= s_i and p_j <= p_i and (s_j > s_i or p_j < p_i)
            for j, (s_j, p_j) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def lineage(folder: str | Path) -> list[dict]:
    """The artifact and its ancestors, newest first: stage, key settings, folder."""
    chain = []
    for path, m in ancestors(folder):
        if m is None:
            break
        chain.append({"folder": str(path), "stage": m.stage, "settings": _key_settings(m.stage, m.settings)})
    return chain


_KEYS = {
    "quantize": ("method", "bits", "group_size", "include_embeddings"),
    "export": ("dtype", "optimize", "ort_int8", "accuracy_level"),
    "prune": ("layers", "heads", "embd", "mlp", "depth_metric"),
    "distill": ("max_steps", "batch_size", "kd_weight", "ce_weight", "temperature", "divergence", "hidden_weight"),
    "pretrain": ("preset", "n_layer", "n_head", "n_embd", "max_steps"),
}


def _key_settings(stage: str, settings: dict) -> dict:
    keys = _KEYS.get(stage)
    if keys is None:
        return {}
    return {k: settings[k] for k in keys if settings.get(k) not in (None, "")}


def describe(chain: list[dict]) -> str:
    """One line naming what an artifact is, e.g. 'ONNX of int4 RTN (g32) of distilled of pruned (layers=2)'."""
    parts = []
    for link in chain:
        s, st = link["settings"], link["stage"]
        if st == "export":
            parts.append("ONNX" + (" ORT-int8" if s.get("ort_int8") else "") + (" fp16" if s.get("dtype") == "fp16" else ""))
        elif st == "quantize":
            g = f" g{s['group_size']}" if s.get("group_size") else ""
            parts.append(f"int{s.get('bits')} {str(s.get('method', '')).upper()}{g}")
        elif st == "distill":
            parts.append(f"distilled ({s.get('max_steps')} steps)")
        elif st == "prune":
            shape = ",".join(f"{k}={s[k]}" for k in ("layers", "heads", "embd", "mlp") if k in s)
            parts.append(f"pruned ({shape})")
        elif st == "pretrain":
            parts.append(f"teacher ({s.get('n_layer')}x{s.get('n_embd')})")
        elif st == "finetune":
            parts.append("finetuned")
        elif st == "import":
            parts.append(f"teacher ({s.get('model')})")
    return " of ".join(parts) if parts else "model"


def build_report(folders: dict[str, str], measurements: dict[str, dict], settings: dict, machine: dict,
                 baseline: str | None = None, command: str | None = None) -> dict:
    """The report dict: one row per artifact (its lineage from the manifests plus its
    measurements), ratios against the baseline, the Pareto front and the headline."""
    # Classifiers have no perplexity or decode speed: they get their own table.
    # The folder the caller names wins over a measurement's own (which may be relative to where
    # the measurement was stored).
    classifiers = [{"name": n, **measurements[n], "folder": folders[n], "what": describe(lineage(folders[n]))}
                   for n in folders if "accuracy" in measurements[n]]
    names = [n for n in folders if "accuracy" not in measurements[n]]
    if not names:
        raise ConfigError("no language models to report on (classifiers alone have no baseline row)")
    baseline = baseline or names[0]
    if baseline not in folders:
        raise ConfigError(f"baseline {baseline!r} is not one of the models {names}")
    base = measurements[baseline]
    base_speed = base["speed"][0]["decode_tok_s"]
    rows = []
    for name in names:
        m = measurements[name]
        chain = lineage(folders[name])
        speed = m["speed"][0]["decode_tok_s"]
        rows.append({
            "name": name,
            "folder": folders[name],
            "what": describe(chain),
            "stages": [c["stage"] for c in chain],
            "lineage": chain,
            **{k: v for k, v in m.items() if k != "folder"},
            "x_faster": speed / base_speed,
            "x_smaller": base["file_bytes"] / m["file_bytes"] if m["file_bytes"] else None,
            # what a file costs per weight on disk: 32 for float32, about 4.6 for int4 g32 with its scales
            "bits_per_parameter": 8 * m["file_bytes"] / m["parameters"] if m.get("parameters") else None,
            "perplexity_delta": m["perplexity"] / base["perplexity"] - 1.0,
        })
    front = pareto_front([(r["speed"][0]["decode_tok_s"], r["perplexity"]) for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    students = [r for r in rows if r["name"] != baseline and any(s in r["stages"] for s in STUDENT_STAGES)
                and r["perplexity_delta"] <= HEADLINE_PPL_TOLERANCE]
    headline = None
    if students:
        best = max(students, key=lambda r: r["speed"][0]["decode_tok_s"])
        headline = {"name": best["name"], "what": best["what"], "x_faster": best["x_faster"],
                    "x_smaller": best["x_smaller"], "perplexity_delta": best["perplexity_delta"],
                    "tolerance": HEADLINE_PPL_TOLERANCE}
    return {"baseline": baseline, "headline": headline, "rows": rows, "classifiers": classifiers,
            "settings": settings, "machine": machine, "command": command}


# ---------------------------------------------------------------------------------------
# Rendering


def _bits(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}"


def _kl(d: dict | None) -> str:
    return "–" if d is None else f"{d['kl_mean']:.4f} ({100 * d['top1_agreement']:.1f}% top-1)"


def _params(n: int | None) -> str:
    return "–" if not n else f"{n / 1e6:.2f}M"


def headline_text(report: dict, bold: str = "") -> str:
    """The report's headline sentence (report.md's first line); `bold` marks up its claim."""
    h = report["headline"]
    if not h:
        return f"No student is within {HEADLINE_PPL_TOLERANCE:.0%} of the teacher's perplexity."
    return (f"{bold}Headline: `{h['name']}` ({h['what']}) is {h['x_faster']:.2f}x faster and "
            f"{h['x_smaller']:.2f}x smaller than the teacher at {h['perplexity_delta']:+.1%} perplexity{bold} "
            f"(the fastest student within {h['tolerance']:.0%} of the teacher's perplexity).")


def headline_folders(report_folder: str | Path) -> dict[str, Path]:
    """{row name: model folder} of the report's baseline and headline (the headline only when
    there is one), read from report.json, whose folders are relative to the report's own."""
    report_folder = Path(report_folder)
    report = load_report(report_folder / "report.json")
    names = [report["baseline"]] + ([report["headline"]["name"]] if report["headline"] else [])
    folders = {r["name"]: r["folder"] for r in report["rows"]}
    return {name: (report_folder / folders[name]).resolve() for name in names}


def _headline(report: dict) -> list[str]:
    h = report["headline"]
    if h:
        return [f"**Headline: `{h['name']}` ({h['what']}) is {h['x_faster']:.2f}x faster and "
                f"{h['x_smaller']:.2f}x smaller than the teacher at {h['perplexity_delta']:+.1%} perplexity** "
                f"(the fastest student within {h['tolerance']:.0%} of the teacher's perplexity).", ""]
    return [f"No student is within {HEADLINE_PPL_TOLERANCE:.0%} of the teacher's perplexity.", ""]


def _main_table(rows: list[dict], baseline: str) -> list[str]:
    """The table of every language model: one row each, the baseline first."""
    out = [f"Baseline: `{baseline}`. Decode speed at batch {rows[0]['speed'][0]['batch']}; x faster = decode tok/s "
           "over the baseline's; x smaller = baseline file bytes over the row's; bits/param = file bits over "
           "parameters; perplexity measured through each artifact's own runtime on the same tokens. ◆ = on the "
           "Pareto front (perplexity vs decode speed).", ""]
    out += ["| model | what | runtime | params | file MB | bits/param | perplexity | Δ ppl | KL vs baseline | "
            "decode tok/s | x faster | x smaller | TTFT ms | prefill tok/s | peak RSS MiB (model) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["speed"][0]
        mem = r.get("memory", {}).get("peak_rss_mib")
        smaller = "–" if r["x_smaller"] is None else f"{r['x_smaller']:.2f}x"
        mem_s = "–" if mem is None else f"{mem:.0f} ({r['memory'].get('model_rss_mib', 0):+.0f})"
        is_base = r["name"] == baseline
        name = f"**{r['name']}** (baseline)" if is_base else r["name"]
        kl = "0 (reference)" if is_base else _kl(r.get("divergence"))
        out.append(
            f"| {'◆ ' if r['pareto'] else ''}{name} | {r['what']} | {r['runtime']} | {_params(r['parameters'])} | "
            f"{_mb(r['file_bytes'])} | {_bits(r.get('bits_per_parameter'))} | {r['perplexity']:.3f} | "
            f"{r['perplexity_delta']:+.1%} | {kl} | {sp['decode_tok_s']:.0f} | {r['x_faster']:.2f}x | {smaller} | "
            f"{sp['ttft_ms_median']:.1f} | {sp['prefill_tok_s']:.0f} | {mem_s} |")
    return out


def _speed_table(rows: list[dict]) -> list[str]:
    out = ["", "## Speed at every batch size", "",
           "| model | batch | decode tok/s | step ms median | step ms p90 | TTFT ms median | TTFT ms p90 | "
           "prefill tok/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for sp in r["speed"]:
            out.append(f"| {r['name']} | {sp['batch']} | {sp['decode_tok_s']:.0f} | {sp['step_ms_median']:.2f} | "
                       f"{sp['step_ms_p90']:.2f} | {sp['ttft_ms_median']:.2f} | {sp['ttft_ms_p90']:.2f} | "
                       f"{sp['prefill_tok_s']:.0f} |")
    return out


def _classifier_table(classifiers: list[dict]) -> list[str]:
    if not classifiers:
        return []
    out = ["", "## Classifiers", "", "Accuracy on the held-out split each classifier's finetuning used; latency "
           "of one example at batch 1 (PyTorch).", "",
           "| model | what | params | file MB | accuracy | macro F1 | examples | latency ms median | p90 | data |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in classifiers:
        out.append(f"| {c['name']} | {c['what']} | {_params(c['parameters'])} | {_mb(c['file_bytes'])} | "
                   f"{c['accuracy']:.4f} | {c['macro_f1']:.4f} | {c['examples']:,} | {c['latency_ms_median']:.2f} | "
                   f"{c['latency_ms_p90']:.2f} | {c['eval']['data']} |")
    return out


def _how_measured(rows: list[dict], s: dict) -> list[str]:
    """How the figures were measured, from the first row's evaluation and the settings `s`."""
    ev = rows[0]["eval"]
    memory = rows[0].get("memory")
    baseline_rss = (f"the process before opening the baseline: {memory['runtime_baseline_rss_mib']:.0f} MiB)."
                    if memory else "not measured in this run).")
    return ["", "## How it was measured", "",
            f"- Perplexity: {ev['tokens']:,} scored tokens of the {ev['data']}, sliding windows of each model's "
            f"context ({ev['max_length']}), stride {ev['stride']}; ONNX exports through ONNX Runtime, others "
            "through PyTorch.",
            f"- Speed: prompt of {s['prompt_tokens']} validation tokens, {s['new_tokens']} new tokens (greedy), batch "
            f"sizes {s['batch_sizes']}; {s['warmup']} warm-up run(s), {s['repeats']} timed runs; medians and p90 over "
            f"decode steps; {s['threads']} threads for every runtime.",
            "- Peak RSS: a separate process per artifact opens it and generates once; peak includes the "
            "interpreter and the artifact's runtime libraries, (model) is the resident growth from opening "
            "the model to the end of the generation (" + baseline_rss,
            "- KL vs baseline: mean KL(baseline || model) per scored token in nats, over the same windows as "
            "the perplexity, and the share of those tokens where both rank the same token first; what a "
            "compressed model changed, token by token (– where the tokenizers or contexts differ).",
            "- File size: model.safetensors / model.onnx (+ .data); manifests, logs and checkpoints excluded."]


def _machine_and_artifacts(report: dict, rows: list[dict]) -> list[str]:
    mach = report["machine"]
    out = ["", "## Machine", "",
           f"{mach.get('cpu')}, {mach.get('cores')} cores, {mach.get('memory_gib')} GiB, "
           f"{'GPU ' + mach['gpu'] if mach.get('gpu') else 'no GPU'}; {mach.get('os')}.",
           "", "Versions: " + ", ".join(f"{k} {v}" for k, v in (mach.get("versions") or {}).items()), ""]
    if report.get("command"):
        out += [f"Command: `{report['command']}`", ""]
    out += ["## Artifacts", ""]
    for r in rows:
        out.append(f"- `{r['name']}`: {r['folder']} — " + " ← ".join(c["stage"] for c in r["lineage"]))
    return out


def render_markdown(report: dict) -> str:
    """report.md: headline, the table with the baseline row first, per-batch speed, classifiers,
    how it was measured, machine and artifacts."""
    rows = sorted(report["rows"], key=lambda r: (r["name"] != report["baseline"], -r["speed"][0]["decode_tok_s"]))
    out = ["# CompactGPT benchmark: teacher vs students", ""]
    out += _headline(report)
    out += _main_table(rows, report["baseline"])
    out += _speed_table(rows)
    out += _classifier_table(report.get("classifiers"))
    out += _how_measured(rows, report["settings"])
    out += _machine_and_artifacts(report, rows)
    out += ["", "![perplexity vs decode speed](pareto.png)", "", "![file size](size.png)", ""]
    return "\n".join(out)


def plot_pareto(report: dict, path: Path) -> None:
    """Perplexity vs decode tokens/s, point area by file size, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    xs = [r["speed"][0]["decode_tok_s"] for r in rows]
    ys = [r["perplexity"] for r in rows]
    sizes = [max(r["file_bytes"], 1) for r in rows]
    biggest = max(sizes)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=130)
    colors = {"onnx": "#1f77b4", "pytorch": "#ff7f0e", "pytorch-quantized": "#2ca02c"}
    # Labels alternate above and below, in order of speed, so neighbours do not overprint.
    order = sorted(range(len(rows)), key=lambda i: (xs[i], ys[i]))
    for rank, i in enumerate(order):
        r, x, y, sz = rows[i], xs[i], ys[i], sizes[i]
        ax.scatter(x, y, s=60 + 900 * sz / biggest, color=colors.get(r["runtime"], "grey"), alpha=0.55,
                   edgecolors="black" if r["pareto"] else "none", linewidths=1.5, zorder=3)
        dy = 10 + 9 * (rank % 3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, dy if rank % 2 == 0 else -dy),
                    fontsize=7.5, ha="left", va="center",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
    front = [i for i, r in enumerate(rows) if r["pareto"]]
    front.sort(key=lambda i: xs[i])
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="crimson", lw=1.5,
            label="Pareto front", zorder=2)
    base = next(r for r in rows if r["name"] == report["baseline"])
    ax.axhline(base["perplexity"] * (1 + HEADLINE_PPL_TOLERANCE), color="grey", ls="--", lw=1,
               label=f"teacher perplexity +{HEADLINE_PPL_TOLERANCE:.0%}")
    for kind, c in colors.items():
        if any(r["runtime"] == kind for r in rows):
            ax.scatter([], [], color=c, alpha=0.55, label=kind)
    tol = base["perplexity"] * (1 + HEADLINE_PPL_TOLERANCE)
    lo, hi = min(ys), max(max(ys), tol)
    pad = (hi - lo) * 0.08 or 1.0
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.35)
    ax.set_xscale("log")
    ax.set_xlabel(f"decode tokens/s (batch {rows[0]['speed'][0]['batch']}, log scale) →  faster")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Teacher vs students: perplexity vs decode speed (point area ~ file size)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sizes(report: dict, path: Path) -> None:
    """File size of every artifact, a horizontal bar chart, baseline highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda r: r["file_bytes"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5), dpi=130)
    mb = [r["file_bytes"] / 1e6 for r in rows]
    colors = ["crimson" if r["name"] == report["baseline"] else "#1f77b4" for r in rows]
    ax.barh([r["name"] for r in rows], mb, color=colors)
    for i, (r, v) in enumerate(zip(rows, mb)):
        label = f"{v:.1f} MB" + (f"  ({r['x_smaller']:.1f}x smaller)" if r["x_smaller"] and r["name"] != report["baseline"] else "")
        ax.text(v, i, " " + label, va="center", fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_title("Artifact size (baseline in red)")
    ax.set_xlim(0, max(mb) * 1.45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Record keys whose values name folders ("data" may be a text source: "val split of FOLDER").
PATH_KEYS = ("folder", "reference", "data")


def relative_folders(record, base: str | Path):
    """A copy of a JSON-like record whose folder paths (PATH_KEYS, also at the end of a text such
    as "val split of FOLDER") are relative to `base`, so a report still names the right folders
    after its run folder is moved or copied to another machine."""
    if isinstance(record, dict):
        return {k: (_relative_path(v, base) if k in PATH_KEYS and isinstance(v, str) else relative_folders(v, base))
                for k, v in record.items()}
    if isinstance(record, list):
        return [relative_folders(v, base) for v in record]
    return record


def _relative_path(value: str, base: str | Path) -> str:
    prefix, sep, path = value.rpartition(" of ")
    if not (Path(path).is_absolute() or Path(path).exists()):  # plain text or a hub id
        return value
    return prefix + sep + os.path.relpath(Path(path).resolve(), Path(base).resolve())


def write_report(report: dict, out: str | Path) -> Path:
    """Write report.json, report.md, pareto.png and size.png to `out` (each atomically).
    Folders are recorded relative to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = relative_folders(report, out)
    atomic_write_json(out / "report.json", report)
    plot_pareto(report, out / "pareto.png")
    plot_sizes(report, out / "size.png")
    atomic_write_text(out / "report.md", render_markdown(report))
    return out


def load_report(path: str | Path) -> dict:
    """A report.json written by write_report."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
