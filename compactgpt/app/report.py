"""The benchmark report: report.json, report.md and PNG plots, built from the artifacts'
manifests and the measurements alone (nothing is re-measured or re-trained here).

The baseline row (the teacher) anchors every ratio: x faster is decode tokens/s at the
first batch size over the baseline's, x smaller is the baseline's file bytes over the row's,
and the perplexity delta is relative to the baseline's perplexity on the same tokens.
Rows of several runtimes sit side by side (PyTorch, ONNX Runtime, llama.cpp); a row whose
runtime did not run a batch size shows "—" there, and a row bench could not measure (its
record says why under "absent") is listed apart, outside the table, the front and the plots.
"""

from __future__ import annotations

import json
import os
from itertools import product
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..io import atomic_write, atomic_write_json, atomic_write_text
from ..lineage import ancestors

# The headline student: the fastest whose perplexity is at most this far above the baseline's.
HEADLINE_PPL_TOLERANCE = 0.10
STUDENT_STAGES = ("distill", "prune")
# What a cell without a figure shows (a batch size a runtime did not run, a KL with another tokenizer).
MISSING = "—"
# The runtime each kind of record was measured through, as the report names it.
RUNTIME_NAMES = {"pytorch": "PyTorch", "pytorch-quantized": "PyTorch (int weights)",
                 "quantized": "PyTorch (int weights)", "onnx": "ONNX Runtime", "gguf": "llama.cpp"}
# (marker, colour) of each runtime in the plots; another runtime gets RUNTIME_STYLE_OTHER.
RUNTIME_STYLE = {"pytorch": ("o", "#ff7f0e"), "pytorch-quantized": ("s", "#2ca02c"),
                 "quantized": ("s", "#2ca02c"), "onnx": ("^", "#1f77b4"), "gguf": ("D", "#9467bd")}
RUNTIME_STYLE_OTHER = ("P", "grey")


def runtime_name(runtime: str | None) -> str:
    """The readable name of a record's runtime ("gguf" -> "llama.cpp"); an unknown one as it is."""
    return RUNTIME_NAMES.get(runtime, str(runtime))


def speed_at(row: dict, batch: int) -> dict | None:
    """The row's speed figures at `batch`, None where its runtime did not run that batch size
    (llama-cpp-python runs one sequence: batch 1 only)."""
    return next((sp for sp in row.get("speed") or [] if sp["batch"] == batch), None)


def decode_at(row: dict, batch: int) -> float | None:
    """Decode tokens/s of the row at `batch`, None where it has no figure there."""
    sp = speed_at(row, batch)
    return None if sp is None else sp["decode_tok_s"]


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
    "export": ("format", "dtype", "optimize", "ort_int8", "accuracy_level"),
    "prune": ("layers", "heads", "embd", "mlp", "depth_metric"),
    "distill": ("max_steps", "batch_size", "kd_weight", "ce_weight", "temperature", "divergence", "hidden_weight"),
    "pretrain": ("preset", "n_layer", "n_head", "n_embd", "max_steps"),
}


# A GGUF export's settings that matter (the ONNX ones are unused there).
_GGUF_KEYS = ("format", "gguf_type")


def _key_settings(stage: str, settings: dict) -> dict:
    keys = _KEYS.get(stage)
    if keys is None:
        return {}
    if stage == "export" and settings.get("format") == "gguf":
        keys = _GGUF_KEYS
    return {k: settings[k] for k in keys if settings.get(k) not in (None, "")}


def describe(chain: list[dict]) -> str:
    """One line naming what an artifact is, e.g. 'ONNX of int4 RTN (g32) of distilled of pruned (layers=2)'
    or 'GGUF of int4 RTN g32 of ...'."""
    parts = []
    for i, link in enumerate(chain):
        s, st = link["settings"], link["stage"]
        if st == "export" and s.get("format") == "gguf":
            # A quantized artifact keeps its codes: gguf_type applies to float models only.
            of_quantized = i + 1 < len(chain) and chain[i + 1]["stage"] == "quantize"
            parts.append("GGUF" + ("" if of_quantized or not s.get("gguf_type") else f" {s['gguf_type']}"))
        elif st == "export":
            parts.append("ONNX" + (" ORT-int8" if s.get("ort_int8") else "")
                         + (" fp16" if s.get("dtype") == "fp16" else ""))
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
    measurements), ratios against the baseline, the Pareto front and the headline.
    A measurement with "absent" (a runtime that is not installed) goes to the report's "absent"
    list, outside the rows. Speed ratios and the front read decode speed at the baseline's
    first batch size; a row without a figure there gets x_faster None and stays off the front.
    Raises ConfigError for no language model to report on or a baseline that is not a measured
    language model."""
    # Classifiers have no perplexity or decode speed: they get their own table.
    # The folder the caller names wins over a measurement's own (which may be relative to where
    # the measurement was stored).
    absent = [{"name": n, "folder": folders[n], "runtime": measurements[n].get("runtime"),
               "absent": measurements[n]["absent"]} for n in folders if "absent" in measurements[n]]
    measured = [n for n in folders if "absent" not in measurements[n]]
    classifiers = [{"name": n, **measurements[n], "folder": folders[n], "what": describe(lineage(folders[n]))}
                   for n in measured if "accuracy" in measurements[n]]
    names = [n for n in measured if "accuracy" not in measurements[n]]
    if not names:
        unmeasured = "".join(f"; {a['name']} not measured: {a['absent']}" for a in absent)
        raise ConfigError(f"no language models to report on (classifiers alone have no baseline row){unmeasured}")
    baseline = baseline or names[0]
    if baseline not in folders:
        raise ConfigError(f"baseline {baseline!r} is not one of the models {names}")
    if baseline not in names:
        why = measurements[baseline].get("absent") or "it is a classifier"
        raise ConfigError(f"baseline {baseline!r} was not measured as a language model ({why}); choose another "
                          f"baseline among {names}")
    base = measurements[baseline]
    batch = base["speed"][0]["batch"]
    base_speed = base["speed"][0]["decode_tok_s"]
    rows = []
    for name in names:
        m = measurements[name]
        chain = lineage(folders[name])
        speed = decode_at(m, batch)
        rows.append({
            "name": name,
            "folder": folders[name],
            "what": describe(chain),
            "stages": [c["stage"] for c in chain],
            "lineage": chain,
            **{k: v for k, v in m.items() if k != "folder"},
            "x_faster": None if speed is None else speed / base_speed,
            "x_smaller": base["file_bytes"] / m["file_bytes"] if m["file_bytes"] else None,
            # what a file costs per weight on disk: 32 for float32, about 4.6 for int4 g32 with its scales
            "bits_per_parameter": 8 * m["file_bytes"] / m["parameters"] if m.get("parameters") else None,
            "perplexity_delta": m["perplexity"] / base["perplexity"] - 1.0,
        })
    timed = [i for i, r in enumerate(rows) if r["x_faster"] is not None]
    front = {timed[j] for j in pareto_front([(decode_at(rows[i], batch), rows[i]["perplexity"]) for i in timed])}
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    students = [r for r in rows if r["name"] != baseline and any(s in r["stages"] for s in STUDENT_STAGES)
                and r["perplexity_delta"] <= HEADLINE_PPL_TOLERANCE and r["x_faster"] is not None]
    headline = None
    if students:
        best = max(students, key=lambda r: r["x_faster"])
        headline = {"name": best["name"], "what": best["what"], "x_faster": best["x_faster"],
                    "x_smaller": best["x_smaller"], "perplexity_delta": best["perplexity_delta"],
                    "tolerance": HEADLINE_PPL_TOLERANCE}
    return {"baseline": baseline, "headline": headline, "rows": rows, "classifiers": classifiers,
            "absent": absent, "settings": settings, "machine": machine, "command": command}


def _speed_batch(report: dict) -> int:
    """The batch size the ratios, the main table and the Pareto plot read: the baseline's first."""
    base = next(r for r in report["rows"] if r["name"] == report["baseline"])
    return base["speed"][0]["batch"]


# ---------------------------------------------------------------------------------------
# Rendering


def _bits(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _mb(n: float | None) -> str:
    return MISSING if n is None else f"{n / 1e6:.2f}"


def _kl(d: dict | None) -> str:
    return MISSING if d is None else f"{d['kl_mean']:.4f} ({100 * d['top1_agreement']:.1f}% top-1)"


def _params(n: int | None) -> str:
    return MISSING if not n else f"{n / 1e6:.2f}M"


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return MISSING if value is None else f"{value:{spec}}{suffix}"


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


def _main_table(rows: list[dict], baseline: str, batch: int) -> list[str]:
    """The table of every measured language model: one row each, the baseline first."""
    out = [f"Baseline: `{baseline}`. Decode speed at batch {batch}; x faster = decode tok/s "
           "over the baseline's; x smaller = baseline file bytes over the row's; bits/param = file bits over "
           "parameters; perplexity measured through each artifact's own runtime on the same tokens. ◆ = on the "
           f"Pareto front (perplexity vs decode speed); {MISSING} = no figure (e.g. a batch size the runtime "
           "does not run).", ""]
    out += ["| model | what | runtime | params | file MB | bits/param | perplexity | Δ ppl | KL vs baseline | "
            "decode tok/s | x faster | x smaller | TTFT ms | prefill tok/s | peak RSS MiB (model) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = speed_at(r, batch) or {}
        mem = (r.get("memory") or {}).get("peak_rss_mib")
        mem_s = MISSING if mem is None else f"{mem:.0f} ({r['memory'].get('model_rss_mib', 0):+.0f})"
        is_base = r["name"] == baseline
        name = f"**{r['name']}** (baseline)" if is_base else r["name"]
        kl = "0 (reference)" if is_base else _kl(r.get("divergence"))
        out.append(
            f"| {'◆ ' if r['pareto'] else ''}{name} | {r['what']} | {runtime_name(r['runtime'])} | "
            f"{_params(r['parameters'])} | {_mb(r['file_bytes'])} | {_bits(r.get('bits_per_parameter'))} | "
            f"{r['perplexity']:.3f} | {r['perplexity_delta']:+.1%} | {kl} | {_num(sp.get('decode_tok_s'), '.0f')} | "
            f"{_num(r['x_faster'], '.2f', 'x')} | {_num(r['x_smaller'], '.2f', 'x')} | "
            f"{_num(sp.get('ttft_ms_median'), '.1f')} | {_num(sp.get('prefill_tok_s'), '.0f')} | {mem_s} |")
    return out


def _batches(rows: list[dict]) -> list[int]:
    """Every batch size any row ran, in the order the rows list them (the baseline's first)."""
    seen: list[int] = []
    for r in rows:
        seen += [sp["batch"] for sp in r["speed"] if sp["batch"] not in seen]
    return seen


def _speed_table(rows: list[dict], baseline: str) -> list[str]:
    """Every row at every batch size any row ran; a batch size its runtime did not run shows
    MISSING, and so does its x faster (decode tok/s over the baseline's at the same batch)."""
    base = next(r for r in rows if r["name"] == baseline)
    out = ["", "## Speed at every batch size", "",
           "| model | runtime | batch | decode tok/s | x faster | step ms median | step ms p90 | TTFT ms median | "
           "TTFT ms p90 | prefill tok/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b in _batches(rows):
            sp, base_tok_s = speed_at(r, b), decode_at(base, b)
            head = f"| {r['name']} | {runtime_name(r['runtime'])} | {b} |"
            if sp is None:
                out.append(head + f" {MISSING} |" * 7)
                continue
            faster = None if base_tok_s is None else sp["decode_tok_s"] / base_tok_s
            out.append(f"{head} {sp['decode_tok_s']:.0f} | {_num(faster, '.2f', 'x')} | {sp['step_ms_median']:.2f} | "
                       f"{sp['step_ms_p90']:.2f} | {sp['ttft_ms_median']:.2f} | {sp['ttft_ms_p90']:.2f} | "
                       f"{sp['prefill_tok_s']:.0f} |")
    return out


def _not_measured(absent: list[dict]) -> list[str]:
    """The rows bench could not measure (a runtime not installed), each with its reason."""
    if not absent:
        return []
    out = ["", "## Not measured", ""]
    for a in absent:
        out.append(f"- `{a['name']}` ({runtime_name(a.get('runtime'))}, {a['folder']}): {a['absent']}")
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
    one_sequence = " (llama.cpp runs one sequence: batch 1 only)" if any(r["runtime"] == "gguf" for r in rows) else ""
    return ["", "## How it was measured", "",
            f"- Perplexity: {ev['tokens']:,} scored tokens of the {ev['data']}, sliding windows of each model's "
            f"context ({ev['max_length']}), stride {ev['stride']}; ONNX exports through ONNX Runtime, GGUF "
            "exports through llama.cpp, others through PyTorch.",
            f"- Speed: prompt of {s['prompt_tokens']} validation tokens, {s['new_tokens']} new tokens (greedy), batch "
            f"sizes {s['batch_sizes']}{one_sequence}; {s['warmup']} warm-up run(s), "
            f"{s['repeats']} timed runs; medians and p90 over decode steps; {s['threads']} threads for every "
            "runtime.",
            "- Peak RSS: a separate process per artifact opens it and generates once; peak includes the "
            "interpreter and the artifact's runtime libraries, (model) is the resident growth from opening "
            "the model to the end of the generation (" + baseline_rss,
            "- KL vs baseline: mean KL(baseline || model) per scored token in nats, over the same windows as "
            "the perplexity, and the share of those tokens where both rank the same token first; what a "
            f"compressed model changed, token by token ({MISSING} where the tokenizers or contexts differ).",
            "- File size: model.safetensors / model.onnx (+ .data) / model.gguf; manifests, logs and checkpoints "
            "excluded."]


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
    """report.md: headline, the table with the baseline row first, per-batch speed, the rows not
    measured (with their reasons), classifiers, how it was measured, machine and artifacts."""
    batch = _speed_batch(report)

    def order(r: dict) -> tuple:
        tok_s = decode_at(r, batch)
        return r["name"] != report["baseline"], tok_s is None, -(tok_s or 0.0)

    rows = sorted(report["rows"], key=order)
    out = ["# CompactGPT benchmark: teacher vs students", ""]
    out += _headline(report)
    out += _main_table(rows, report["baseline"], batch)
    out += _speed_table(rows, report["baseline"])
    out += _not_measured(report.get("absent") or [])
    out += _classifier_table(report.get("classifiers"))
    out += _how_measured(rows, report["settings"])
    out += _machine_and_artifacts(report, rows)
    out += ["", "![perplexity vs decode speed](pareto.png)", "", "![file size](size.png)", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Plots

# Label placement: unit directions tried around a point (right first: labels read from their
# point), at gaps (points, beyond the marker's edge) growing until one fits.
_DIRECTIONS = ((1, 0), (1, 1), (1, -1), (0, 1), (0, -1), (-1, 0), (-1, 1), (-1, -1))
_GAPS = (3, 10, 18, 28, 40, 54, 70, 90, 115, 145)
_LABEL_MARGIN_PX = 2  # clear space kept around every label


def _overlap_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def place_labels(ax, points: Sequence[tuple[float, float]], labels: Sequence[str], radii: Sequence[float],
                 fontsize: float = 7.5) -> list:
    """Write each label beside its point (data coordinates) where it overlaps no label placed
    before it and no point's marker (a square of half-side `radii[i]`, in points), inside the
    axes. Candidates: 8 directions at growing gaps, the first that fits is kept; a label placed
    away from its point gets a thin leader line to it. Where nothing fits, the candidate that
    overlaps least. Deterministic (the same figure places the same way); the axes' limits and
    layout must be final, since boxes are measured in display pixels. Returns the labels'
    matplotlib Bboxes in display pixels, in the order of `labels`."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # the renderer measures text only after a draw
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0  # pixels per point
    area = ax.get_window_extent(renderer)
    centres = [ax.transData.transform(p) for p in points]
    markers = [Bbox.from_extents(cx - r * px, cy - r * px, cx + r * px, cy + r * px)
               for (cx, cy), r in zip(centres, radii)]
    boxes: list = []
    placed: list = []  # the boxes with their margin
    for (x, y), (cx, cy), label, radius in zip(points, centres, labels, radii):
        # A light box under the text keeps a label over the front's line readable; its padding
        # stays inside the margin kept around every label.
        text = ax.annotate(label, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize, zorder=5,
                           bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7))
        best = None  # (overlap, candidate index, offset, ha, va, box)
        for n, (gap, (ux, uy)) in enumerate(product(_GAPS, _DIRECTIONS)):
            dx, dy = ux * (radius + gap), uy * (radius + gap)  # from the marker's edge (or corner)
            ha = "left" if ux > 0 else "right" if ux < 0 else "center"
            va = "bottom" if uy > 0 else "top" if uy < 0 else "center"
            text.set_position((dx, dy))
            text.set_ha(ha)
            text.set_va(va)
            box = text.get_window_extent(renderer)
            padded = box.padded(_LABEL_MARGIN_PX)
            overlap = sum(_overlap_area(padded, b) for b in placed + markers)
            # What lies outside the axes counts as overlap: the label would leave the plot.
            overlap += padded.width * padded.height - _overlap_area(padded, area)
            if best is None or overlap < best[0]:
                best = (overlap, n, (dx, dy), ha, va, box)
            if overlap == 0:
                break
        _, index, (dx, dy), ha, va, box = best
        text.set_position((dx, dy))
        text.set_ha(ha)
        text.set_va(va)
        boxes.append(box)
        placed.append(box.padded(_LABEL_MARGIN_PX))
        if index >= len(_DIRECTIONS):  # moved past the first ring: a line says which point it names
            ends = ax.transData.inverted().transform([(cx, cy), (cx + dx * px, cy + dy * px)])
            ax.plot(ends[:, 0], ends[:, 1], color="grey", lw=0.5, zorder=2.5)
    return boxes


def _runtime_style(runtime: str | None) -> tuple[str, str]:
    return RUNTIME_STYLE.get(runtime, RUNTIME_STYLE_OTHER)


def _runtimes(rows: list[dict]) -> list:
    """The runtimes of the rows, each once, in RUNTIME_NAMES' order (others after, as met)."""
    known = list(RUNTIME_NAMES)
    present = list(dict.fromkeys(r["runtime"] for r in rows))
    return sorted(present, key=lambda k: (known.index(k) if k in known else len(known), present.index(k)))


def pareto_figure(report: dict):
    """(figure, {row name: label box in display pixels}) of perplexity vs decode tokens/s at the
    baseline's first batch size: a marker shape per runtime, point area by file size, the
    Pareto front drawn, labels placed clear of each other (place_labels). Rows without a figure
    at that batch size are left out. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = _speed_batch(report)
    rows = [r for r in report["rows"] if decode_at(r, batch) is not None]
    xs = [decode_at(r, batch) for r in rows]
    ys = [r["perplexity"] for r in rows]
    sizes = [max(r["file_bytes"] or 0, 1) for r in rows]
    biggest = max(sizes)
    areas = [60 + 900 * sz / biggest for sz in sizes]  # marker areas in points²
    fig, ax = plt.subplots(figsize=(10, 6), dpi=130)
    for r, x, y, a in zip(rows, xs, ys, areas):
        marker, color = _runtime_style(r["runtime"])
        ax.scatter(x, y, s=a, marker=marker, color=color, alpha=0.55,
                   edgecolors="black" if r["pareto"] else "none", linewidths=1.5, zorder=3)
    front = sorted((i for i, r in enumerate(rows) if r["pareto"]), key=lambda i: xs[i])
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="crimson", lw=1.5,
            label="Pareto front", zorder=2)
    base = next(r for r in rows if r["name"] == report["baseline"])
    tol = base["perplexity"] * (1 + HEADLINE_PPL_TOLERANCE)
    ax.axhline(tol, color="grey", ls="--", lw=1, label=f"teacher perplexity +{HEADLINE_PPL_TOLERANCE:.0%}")
    for runtime in _runtimes(rows):
        marker, color = _runtime_style(runtime)
        ax.scatter([], [], s=60, marker=marker, color=color, alpha=0.55, label=runtime_name(runtime))
    lo, hi = min(ys), max(max(ys), tol)
    pad = (hi - lo) * 0.08 or 1.0
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.35)
    ax.set_xscale("log")
    ax.set_xlabel(f"decode tokens/s (batch {batch}, log scale) →  faster")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Teacher vs students: perplexity vs decode speed (point area ~ file size)")
    ax.grid(alpha=0.3, which="both")
    # Outside the axes, so no label can land under it.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()  # the layout is final before labels are measured in pixels
    # The baseline and the front get the first pick of places, then the rest by speed.
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["name"] != report["baseline"], not rows[i]["pareto"],
                                                     xs[i], ys[i]))
    boxes = place_labels(ax, [(xs[i], ys[i]) for i in order], [rows[i]["name"] for i in order],
                         [areas[i] ** 0.5 / 2 for i in order])
    return fig, {rows[i]["name"]: box for i, box in zip(order, boxes)}


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def plot_pareto(report: dict, path: Path) -> dict:
    """pareto.png (pareto_figure) written to `path`; returns its label boxes {row name: Bbox in pixels}."""
    fig, boxes = pareto_figure(report)
    _save_png(fig, path)
    return boxes


def plot_sizes(report: dict, path: Path) -> None:
    """File size of every measured artifact, a horizontal bar chart coloured by runtime, the
    baseline outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda r: r["file_bytes"] or 0)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.8), dpi=130)
    mb = [(r["file_bytes"] or 0) / 1e6 for r in rows]
    is_base = [r["name"] == report["baseline"] for r in rows]
    ax.barh([r["name"] + (" (baseline)" if b else "") for r, b in zip(rows, is_base)], mb,
            color=[_runtime_style(r["runtime"])[1] for r in rows],
            edgecolor=["crimson" if b else "none" for b in is_base], linewidth=2)
    for i, (r, v, b) in enumerate(zip(rows, mb, is_base)):
        label = f"{v:.1f} MB" + (f"  ({r['x_smaller']:.1f}x smaller)" if r["x_smaller"] and not b else "")
        ax.text(v, i, " " + label, va="center", fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_runtime_style(k)[1], label=runtime_name(k)) for k in _runtimes(rows)],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_xlabel("file size (MB)")
    ax.set_title("Artifact size by runtime (baseline outlined in red)")
    ax.set_xlim(0, (max(mb) or 1.0) * 1.45)
    fig.tight_layout()
    _save_png(fig, path)


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
