"""Perplexity, file size and quantization time of every quantization method, side by side.

For each model: fp32, int8 RTN, W8A8 SmoothQuant, LLM.int8, int4 RTN (g128, g32), int4 GPTQ,
int4 AWQ, NF4, and a few variants (symmetric grids, quantized embeddings). Each method
quantizes a fresh copy of the model, writes its artifact, and the artifact is *loaded back*
and scored: the figure is the artifact's, not the in-memory model's. Perplexity is the
sliding-window method of `compactgpt eval` on the model's own validation text (and on
WikiText-2 / TinyShakespeare when the model was trained on them); calibrated methods read
the model's training split. Each quantized row also has the KL divergence of its next-token
distributions from the fp32 model's and their top-1 agreement (`compactgpt eval --reference`):
on small models the perplexity gaps of 4-bit methods are a few hundredths of a point, the
size of the change a 1% shift of the rounding grid makes, while KL measures the damage itself.

Rows are cached in the JSON file, so a long table is filled in several shorter runs:

    python -m benchmarks.quantize --model runs/small [--rows gptq4-g128,awq4-g128] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from compactgpt.artifacts import WEIGHTS, load_model
from compactgpt.errors import CompactGPTError, WriteError
from compactgpt.evaluation import compare_models, model_logits_fn, perplexity
from compactgpt.calibration import data_folder_tokens, heldout_tokens
from compactgpt.lineage import ancestors
from compactgpt.machine import describe, machine_info
from quantize import QuantizeConfig, config_for, load_quantized, quantize_folder, resolve_calibration
from quantize.calibrate import BlockHooks, walk_blocks
from quantize.handlers import BLOCK_LAYERS

# key: (label, method, settings)
ROWS: dict[str, tuple[str, str | None, dict]] = {
    "fp32": ("fp32", None, {}),
    "rtn8": ("int8 RTN per-channel", "rtn", {"bits": 8}),
    "smoothquant": ("W8A8 SmoothQuant (a=0.5)", "smoothquant", {}),
    "bnb-int8": ("LLM.int8 (bitsandbytes, t=6)", "bnb-int8", {}),
    "rtn4-g128": ("int4 RTN g128", "rtn", {"bits": 4, "group_size": 128, "symmetric": False}),
    "rtn4-g32": ("int4 RTN g32", "rtn", {"bits": 4, "group_size": 32, "symmetric": False}),
    "gptq4-g128": ("int4 GPTQ g128", "gptq", {"bits": 4, "group_size": 128, "symmetric": False}),
    "awq4-g128": ("int4 AWQ g128", "awq", {"bits": 4, "group_size": 128, "symmetric": False}),
    "awq4-g128-noclip": ("int4 AWQ g128, scales only (no clip search)", "awq",
                         {"bits": 4, "group_size": 128, "symmetric": False, "max_shrink": 0.0}),
    "gptq4-g32": ("int4 GPTQ g32", "gptq", {"bits": 4, "group_size": 32, "symmetric": False}),
    "awq4-g32": ("int4 AWQ g32", "awq", {"bits": 4, "group_size": 32, "symmetric": False}),
    "awq4-g32-noclip": ("int4 AWQ g32, scales only (no clip search)", "awq",
                        {"bits": 4, "group_size": 32, "symmetric": False, "max_shrink": 0.0}),
    "rtn4-pc": ("int4 RTN per-channel", "rtn", {"bits": 4, "group_size": 0, "symmetric": False}),
    "gptq4-pc": ("int4 GPTQ per-channel", "gptq", {"bits": 4, "group_size": 0, "symmetric": False}),
    "awq4-pc": ("int4 AWQ per-channel", "awq", {"bits": 4, "group_size": 0, "symmetric": False}),
    "nf4": ("NF4 (bitsandbytes, block 64)", "bnb-nf4", {}),
    "rtn4-g128-sym": ("int4 RTN g128 symmetric", "rtn", {"bits": 4, "group_size": 128, "symmetric": True}),
    "gptq4-g128-sym": ("int4 GPTQ g128 symmetric", "gptq", {"bits": 4, "group_size": 128, "symmetric": True}),
    "rtn8-emb": ("int8 RTN + int8 embeddings", "rtn", {"bits": 8, "include_embeddings": True}),
    "gptq4-g32-emb": ("int4 GPTQ g32 + int4 embeddings", "gptq",
                      {"bits": 4, "group_size": 32, "symmetric": False, "include_embeddings": True}),
    # Symmetric grids use every code (--grid full, the default); midpoint rows are the grid before it.
    "rtn4-g32-sym": ("int4 RTN g32 symmetric", "rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    "gptq4-g32-sym": ("int4 GPTQ g32 symmetric", "gptq", {"bits": 4, "group_size": 32, "symmetric": True}),
    "rtn4-g32-sym-midpoint": ("int4 RTN g32 symmetric, midpoint grid", "rtn",
                              {"bits": 4, "group_size": 32, "symmetric": True, "grid": "midpoint"}),
    "rtn8-midpoint": ("int8 RTN per-channel, midpoint grid", "rtn", {"bits": 8, "grid": "midpoint"}),
    # llama.cpp's Q4_K grid (--grid k).
    "rtn4-k": ("int4 RTN on the Q4_K grid", "rtn", {"bits": 4, "group_size": 32, "grid": "k"}),
    "gptq4-k": ("int4 GPTQ on the Q4_K grid", "gptq", {"bits": 4, "group_size": 32, "grid": "k"}),
}
# (4-bit method row, RTN row at the same bits and group size) pairs judged against the aims.
GAP_PAIRS = [("gptq4-g128", "rtn4-g128"), ("awq4-g128", "rtn4-g128"), ("gptq4-g32", "rtn4-g32"),
             ("awq4-g32", "rtn4-g32"), ("awq4-g128-noclip", "rtn4-g128"),
             ("awq4-g32-noclip", "rtn4-g32"), ("gptq4-pc", "rtn4-pc"), ("awq4-pc", "rtn4-pc"),
             ("gptq4-g128-sym", "rtn4-g128-sym"), ("gptq4-g32-sym", "rtn4-g32-sym"), ("gptq4-k", "rtn4-k")]
EXTRA_DATA = {"wikitext": "wikitext-2-raw", "shakespeare": "tinyshakespeare"}


def trained_on(folder: Path) -> str:
    """The training data spec of a model, followed through its manifests."""
    for _, m in ancestors(folder):
        if m is None:
            break
        if "source" in m.settings:
            return str(m.settings["source"])
        if "data" in m.settings:
            return str(m.settings["data"])
    return ""


def pretraining_val(loaded) -> tuple[torch.Tensor, str]:
    """The val split of the data folder the model's family was pretrained on (its first
    ancestor that is one), else the model's own held-out text."""
    for path, m in ancestors(loaded.folder):
        if m is not None and m.stage == "data":
            return data_folder_tokens(path, loaded.tokenizer, loaded.folder), f"val split of {path}"
    return heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer)


def eval_sets(loaded, shared: Path, max_tokens: int) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (tokens, description): the family's pretraining validation split, plus public
    sets the model was trained on."""
    tokens, source = pretraining_val(loaded)
    sets = {"val": (tokens[:max_tokens] if max_tokens else tokens, source)}
    data = trained_on(loaded.folder)
    for key, folder in EXTRA_DATA.items():
        path = shared / folder
        if key in data.lower() and path.exists():
            # A model finetuned on part of the file is scored on the split its finetuning held out.
            t, s = heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer)
            if folder not in s:
                files = sorted(path.glob("*valid*")) or sorted(path.glob("*test*"))
                if not files:
                    continue
                t, s = heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer, str(files[0]))
            sets[key] = (t[:max_tokens] if max_tokens else t, s)
    return sets


def score(model, sets, n_positions: int, reference=None) -> dict:
    """Perplexity per eval set; with the fp32 `reference`, also the KL divergence of the
    model's next-token distributions from the reference's and their top-1 agreement."""
    out = {}
    for name, (tokens, _) in sets.items():
        if reference is None:
            r = perplexity(model_logits_fn(model), tokens, n_positions)
            out[name] = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens}
        else:
            c = compare_models(model_logits_fn(model), model_logits_fn(reference), tokens, n_positions)
            out[name] = {"perplexity": c.perplexity, "nll": math.log(c.perplexity), "tokens": c.tokens,
                         "kl_mean": c.kl_mean, "kl_median": c.kl_median, "kl_p99": c.kl_p99,
                         "top1_agreement": c.top1_agreement}
    return out


class _ChannelSpread(BlockHooks):
    """Per block, max / median of each projection's per-input-channel sum of |x| (the float
    model: the next block reads the float outputs)."""

    def __init__(self):
        self.stats: dict[str, torch.Tensor] = {}
        self.spread: dict[str, list[float]] = {layer: [] for layer in BLOCK_LAYERS}

    def observe(self, layer: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().sum(0)
        self.stats[layer] = m if layer not in self.stats else self.stats[layer] + m

    def quantize(self, index: int, block, layers: tuple[str, ...]) -> None:
        for layer, m in self.stats.items():
            self.spread[layer].append((m.max() / m.median()).item())
        self.stats = {}


@torch.no_grad()
def channel_spread(model_dir: Path, calib_samples: int = 32) -> dict[str, float]:
    """AWQ's premise, measured: per projection type, the largest over the median of the
    per-input-channel mean |x| (averaged over blocks) on calibration windows. Large values
    (tens to hundreds in LLMs with outlier features) give AWQ's scales something to protect;
    values near 1 leave it little to gain over round-to-nearest."""
    loaded = load_model(model_dir)
    model = loaded.model.eval()
    calib = resolve_calibration(loaded, config_for("gptq", calib_samples=calib_samples))
    hooks = _ChannelSpread()
    walk_blocks(model, calib, hooks)
    return {layer: sum(v) / len(v) for layer, v in hooks.spread.items()}


def run_row(key: str, model_dir: Path, work: Path, sets, calib_samples: int) -> dict:
    """Quantize the model as the row says, load the artifact back and score it."""
    label, method, settings = ROWS[key]
    if method is None:  # the reference itself: KL 0, agreement 1 by definition
        loaded = load_model(model_dir)
        t0 = time.perf_counter()
        ppl = score(loaded.model, sets, loaded.model.config.n_positions)
        return {"label": label, "method": "fp32", "settings": {}, "quantize_seconds": 0.0,
                "file_bytes": (model_dir / WEIGHTS).stat().st_size, "perplexity": ppl,
                "eval_seconds": time.perf_counter() - t0}
    config = config_for(method, **settings)
    if config.calibrated and "calib_samples" not in settings:
        config = config.replace(calib_samples=calib_samples)
    out = work / model_dir.name / key
    # The work folder is scratch: a row that is measured is quantized again (its code may have changed).
    quantize_folder(QuantizeConfig(model=str(model_dir), out=str(out), method=config, overwrite=True),
                    log=lambda line: print(line, file=sys.stderr))
    q = load_quantized(out)
    t0 = time.perf_counter()
    ppl = score(q.model, sets, q.model.config.n_positions, reference=load_model(model_dir).model.eval())
    return {"label": label, "method": method, "settings": config.to_dict(),
            "quantize_seconds": q.manifest.metrics["quantize_seconds"], "calibration": q.manifest.extra["calibration"],
            "file_bytes": (out / WEIGHTS).stat().st_size, "perplexity": ppl,
            "eval_seconds": time.perf_counter() - t0, "artifact": str(out)}


def gap_closed(method_ppl: float, rtn_ppl: float, fp_ppl: float) -> float | None:
    """Share of RTN's perplexity gap to fp32 that a method closes (1 = all of it)."""
    gap = rtn_ppl - fp_ppl
    return None if gap <= 0 else (rtn_ppl - method_ppl) / gap


def kl_gap_closed(method: dict, rtn: dict) -> float | None:
    """The same share in KL divergence from fp32 (whose own KL is 0)."""
    if "kl_mean" not in method or "kl_mean" not in rtn or rtn["kl_mean"] <= 0:
        return None
    return 1 - method["kl_mean"] / rtn["kl_mean"]


def render(results: dict) -> str:
    lines = ["# Post-training quantization: perplexity, size, time", ""]
    lines += [f"Machine: {describe(results['machine'])}", ""]
    lines += ["Produced by (rows are cached; each run fills the rows it names):", ""]
    used = [r.get("command") for e in results["models"].values()
            for r in list(e["rows"].values()) + list(e.get("refused", {}).values())]
    lines += [f"    {c}" for c in results["commands"] if c in used]  # those that made the rows shown
    lines += [""]
    for model, entry in results["models"].items():
        rows = entry["rows"]
        sets = entry["eval_sets"]
        lines += [f"## {model}", ""]
        for name, desc in sets.items():
            lines.append(f"- `{name}`: {desc['source']} ({desc['tokens']:,} tokens scored, windows of "
                         f"{entry['n_positions']}, stride {entry['n_positions'] // 2})")
        calib = next((r.get("calibration") for r in rows.values() if r.get("calibration")), None)
        if calib:
            lines.append(f"- calibration: {calib['samples']} windows of {calib['seq_len']} tokens from {calib['source']}")
        lines.append("")
        fp = rows.get("fp32")
        head = ("| method | " + " | ".join(f"ppl {s}" for s in sets)
                + " | Δ vs fp32 | KL vs fp32 (val, 1e-3 nats) | same top-1 | weights file | quantize time |")
        lines += [head, "|" + " --- |" * (len(sets) + 6)]
        for key in ROWS:
            if key not in rows:
                continue
            r = rows[key]
            ppls = " | ".join(f"{r['perplexity'][s]['perplexity']:.3f}" for s in sets)
            delta = ""
            if fp:
                d = r["perplexity"]["val"]["perplexity"] / fp["perplexity"]["val"]["perplexity"] - 1
                delta = f"{100 * d:+.2f}%"
            v = r["perplexity"]["val"]
            kl = "0" if key == "fp32" else (f"{1e3 * v['kl_mean']:.3f}" if "kl_mean" in v else "—")
            top1 = "100%" if key == "fp32" else (f"{100 * v['top1_agreement']:.2f}%" if "kl_mean" in v else "—")
            lines.append(f"| {r['label']} | {ppls} | {delta} | {kl} | {top1} | {r['file_bytes'] / 1e6:.2f} MB | "
                         f"{r['quantize_seconds']:.1f} s |")
        lines.append("")
        for key, r in entry.get("refused", {}).items():
            lines.append(f"- {r['label']}: not applicable to this model: {r['error']}")
        if entry.get("refused"):
            lines.append("")
        if fp:
            fpp = fp["perplexity"]["val"]["perplexity"]
            lines += ["Aims (validation perplexity):", ""]
            for key in ("rtn8", "smoothquant", "bnb-int8"):
                if key in rows:
                    d = 100 * (rows[key]["perplexity"]["val"]["perplexity"] / fpp - 1)
                    lines.append(f"- {rows[key]['label']}: {d:+.2f}% (aim <= +0.5%: {'met' if d <= 0.5 else 'NOT met'})")
            for m, b in GAP_PAIRS:
                if m in rows and b in rows:
                    c = gap_closed(rows[m]["perplexity"]["val"]["perplexity"], rows[b]["perplexity"]["val"]["perplexity"], fpp)
                    txt = "n/a (RTN has no gap)" if c is None else f"{100 * c:.0f}% of RTN's perplexity gap closed"
                    ok = c is not None and c >= 0.5
                    k = kl_gap_closed(rows[m]["perplexity"]["val"], rows[b]["perplexity"]["val"])
                    verdict = f"perplexity {'met' if ok else 'NOT met'}"
                    if k is not None:
                        txt += f"; {100 * k:.0f}% of its KL"
                        verdict += f", KL {'met' if k >= 0.5 else 'NOT met'}"
                    lines.append(f"- {rows[m]['label']} vs {rows[b]['label']}: {txt} (aim >= 50%: {verdict})")
            four = {k: r for k, r in rows.items() if r["settings"].get("bits") == 4 or r["method"] == "bnb-nf4"}
            if four:
                k = min(four, key=lambda k: four[k]["perplexity"]["val"]["perplexity"])
                d = 100 * (four[k]["perplexity"]["val"]["perplexity"] / fpp - 1)
                lines.append(f"- best 4-bit: {four[k]['label']} at {d:+.2f}% (aim <= +5%: {'met' if d <= 5 else 'NOT met'})")
            lines.append("")
        if entry.get("channel_spread"):
            cs = entry["channel_spread"]
            lines += ["Input channel spread (AWQ's premise: max / median of per-channel mean |x|, averaged over "
                      "blocks): " + ", ".join(f"{layer} {v:.1f}" for layer, v in cs.items()), ""]
    lines += ["File sizes are `model.safetensors` of each artifact: projections packed (int4: two values "
              "per byte), the embedding in float32 unless a row says it is quantized. Quantize time is "
              "wall time of `quantize_` (calibration included), excluding loading and saving. KL is "
              "KL(fp32 || quantized) per scored validation token, mean over the same windows as the "
              "perplexity; 'same top-1' is the share of those tokens where both models rank the same token "
              "first.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="float model folder (repeatable)")
    p.add_argument("--rows", help=f"comma-separated rows to run (default all): {', '.join(ROWS)}")
    p.add_argument("--force", action="store_true", help="rerun rows already in the results")
    p.add_argument("--work", default="runs/quantize_bench", help="where the quantized artifacts are written")
    p.add_argument("--out", default="benchmarks/results/quantize", help="results path without suffix")
    p.add_argument("--shared-data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--max-eval-tokens", type=int, default=0, help="score at most this many tokens per set (0 = all)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows for calibrated methods")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    keys = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {list(ROWS)}")
    out = Path(args.out)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {"commands": [], "models": {}}
    results["machine"] = machine_info()
    command = "python -m benchmarks.quantize " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if command not in results["commands"]:
        results["commands"].append(command)
    for model in args.model:
        model_dir = Path(model)
        loaded = load_model(model_dir)
        sets = eval_sets(loaded, Path(args.shared_data), args.max_eval_tokens)
        desc = {k: {"source": s, "tokens": int(t.numel()) - 1} for k, (t, s) in sets.items()}
        entry = results["models"].setdefault(str(model_dir), {"rows": {}})
        if entry.get("eval_sets") != desc:
            entry["rows"] = {}  # scored on other text: start over
        entry["eval_sets"] = desc
        entry["n_positions"] = loaded.model.config.n_positions
        entry["parameters"] = loaded.model.num_parameters()
        del loaded
        entry["channel_spread"] = channel_spread(model_dir)
        for key in keys:
            if key in entry["rows"] and not args.force:
                continue
            print(f"[{model_dir.name}] {key} ...", file=sys.stderr, flush=True)
            try:
                row = run_row(key, model_dir, Path(args.work), sets, args.calib_samples)
            except WriteError:
                raise  # a full disk is no refusal of the method
            except CompactGPTError as e:  # a method this model's shape does not allow: recorded, not fatal
                print(f"[{model_dir.name}] {key}: {e}", file=sys.stderr, flush=True)
                entry.setdefault("refused", {})[key] = {"label": ROWS[key][0], "error": str(e), "command": command}
                continue
            entry["rows"][key] = row
            entry.get("refused", {}).pop(key, None)
            row["command"] = command
            print(f"[{model_dir.name}] {key}: ppl {row['perplexity']['val']['perplexity']:.3f}, "
                  f"{row['file_bytes'] / 1e6:.2f} MB, {row['quantize_seconds']:.1f} s", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            out.with_suffix(".md").write_text(render(results))
    path.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render(results))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
