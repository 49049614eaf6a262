"""Quality per bit: KL divergence from the float model against bits per parameter, for every
CompactGPT grid and method and for llama.cpp's own quantizations, measured by llama.cpp on the
same tokens.

Every point is a GGUF file run by llama-perplexity --kl-divergence against the fp32 GGUF's
logits (benchmarks/gguf.py makes the files and runs the tool; its intermediate files under
--work are shared):

  ours       RTN / GPTQ int4 on the full grid (Q4_0 blocks) with an int4, Q5_0, Q6_K or int8 head;
             RTN / GPTQ on llama.cpp's Q4_K grid with a Q5_0 or Q6_K head; GPTQ mixes chosen by
             --bits-per-weight at 4.5 .. 6.0; RTN int8 (Q8_0); and the earlier midpoint grid for
             comparison.
  llama.cpp  Q3_K_M, Q4_0 (its default mix), Q4_K_M and Q5_K_M (each with and without an
             importance matrix from the same calibration text), Q4_0 --pure, Q6_K, Q8_0.

Writes benchmarks/results/quality_per_bit.{json,md} and quality_per_bit.png (KL against bits per
parameter, log scale, both tools' points), and checks the claims the table supports: RTN int4
against Q4_0 --pure, GPTQ Q4_K + Q6_K head against Q4_K_M with an importance matrix, every mix
point against every point at no more bits, 8-bit against Q8_0.

    python -m benchmarks.quality_per_bit --model runs/pipeline/teacher [--model runs/pipeline/students/student-l2/distilled]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from benchmarks.gguf import MIX_BUDGETS, OURS, RESULTS, THEIRS, bench_model, exact_option, kl3, llamacpp_setup

OUR_ROWS = ["rtn4-g32-head4", "rtn4-g32-head5", "rtn4-g32-head6", "rtn4-g32-head8", "gptq4-g32-head4",
            "gptq4-g32-head5", "gptq4-g32-head6", "gptq4-g32-head8", "rtn4k-head6", "gptq4k-head5", "gptq4k-head6",
            *(f"gptq4k-mix{b:g}" for b in MIX_BUDGETS),
            "rtn8-g32", "rtn4-g32-head4-midpoint", "gptq4-g32-head8-midpoint", "rtn8-g32-midpoint"]
THEIR_ROWS = list(THEIRS)


def points(model_result: dict) -> list[dict]:
    """One point per measured file: key, label, origin, bits per parameter, KL, perplexity."""
    out = []
    for key, r in model_result["rows"].items():
        if "quality" not in r:
            continue
        out.append({"key": key, "label": r["label"], "origin": r["origin"], "bpp": r["bits_per_parameter"],
                    "bytes": r["bytes"], "kl": r["quality"]["kl_mean"], "ppl": r["quality"]["perplexity"]})
    return sorted(out, key=lambda p: p["bpp"])


def envelope_at(group: list[dict], bpp: float) -> float | None:
    """The KL of a group's lower envelope at `bpp` bits per parameter (log-linear between its
    points), or None outside the envelope's range of bits."""
    import math

    front, best = [], math.inf
    for p in sorted(group, key=lambda p: p["bpp"]):
        if p["kl"] < best:
            front.append(p)
            best = p["kl"]
    for a, b in zip(front, front[1:]):
        if a["bpp"] <= bpp <= b["bpp"]:
            t = (bpp - a["bpp"]) / (b["bpp"] - a["bpp"]) if b["bpp"] > a["bpp"] else 0.0
            return math.exp((1 - t) * math.log(a["kl"]) + t * math.log(b["kl"]))
    return None


def checks(pts: list[dict]) -> list[dict]:
    """The claims, each with the figures it rests on and whether it holds."""
    by = {p["key"]: p for p in pts}
    out = []

    def claim(text, ok, figures):
        out.append({"claim": text, "holds": bool(ok), "figures": figures})

    if {"rtn4-g32-head4", "lc-q4_0-pure"} <= set(by):
        a, b = by["rtn4-g32-head4"], by["lc-q4_0-pure"]
        claim("RTN int4 g32 (no calibration, head int4) has KL <= llama.cpp's Q4_0 --pure at no more bits",
              a["kl"] <= b["kl"] and a["bytes"] <= b["bytes"],
              f"KL {kl3(a['kl'])} vs {kl3(b['kl'])} (1e-3 nats) at {a['bpp']:.3f} vs {b['bpp']:.3f} bits/param")
    if {"gptq4k-head6", "lc-q4_k_m-imatrix"} <= set(by):
        a, b = by["gptq4k-head6"], by["lc-q4_k_m-imatrix"]
        claim("GPTQ on the Q4_K grid with a Q6_K head: KL <= 0.5x llama.cpp's Q4_K_M + imatrix at no larger file",
              a["kl"] <= 0.5 * b["kl"] and a["bytes"] <= b["bytes"],
              f"KL {kl3(a['kl'])} vs {kl3(b['kl'])} ({a['kl'] / b['kl']:.2f}x) at {a['bytes']:,} vs {b['bytes']:,} bytes")
    mixes = [p for p in pts if p["key"].startswith("gptq4k-mix")]
    others = [p for p in pts if not p["key"].startswith("gptq4k-mix") and p["key"] != "fp32"]
    for m in mixes:
        rivals = [o for o in others if o["bpp"] <= m["bpp"]]
        best = min(rivals, key=lambda o: o["kl"]) if rivals else None
        claim(f"{m['label']} ({m['bpp']:.3f} bits/param) has lower KL than every other point at no more bits",
              best is None or m["kl"] < best["kl"],
              f"KL {kl3(m['kl'])}" + (f"; best other at <= its bits: {best['label']} {kl3(best['kl'])} at "
                                      f"{best['bpp']:.3f}" if best else ""))
    # "At the same bits": each curve's lower envelope (a file at more bits with a higher KL is
    # dominated), log KL interpolated linearly between its points; no claim outside its range.
    for who, group in (("llama.cpp's", [p for p in pts if p["origin"] == "llama.cpp"]),
                       ("the uniform formats'", [p for p in others if p["origin"] == "CompactGPT"
                                                 and "midpoint" not in p["key"]])):
        for m in mixes:
            at = envelope_at(group, m["bpp"])
            if at is not None:
                claim(f"{m['label']} lies below {who} curve at its {m['bpp']:.3f} bits/param", m["kl"] < at,
                      f"KL {kl3(m['kl'])} vs {kl3(at)} interpolated")
            elif group and m["bpp"] < min(p["bpp"] for p in group):
                # Fewer bits than the curve's first point: below the curve when its KL is lower too.
                first = min(group, key=lambda p: (p["bpp"], p["kl"]))
                claim(f"{m['label']} lies below {who} curve: at {m['bpp']:.3f} bits/param, fewer than its first "
                      "point's, with a lower KL", m["kl"] < first["kl"],
                      f"KL {kl3(m['kl'])} vs {first['label']} {kl3(first['kl'])} at {first['bpp']:.3f}")
    if {"rtn8-g32", "lc-q8_0"} <= set(by):
        a, b = by["rtn8-g32"], by["lc-q8_0"]
        claim("8-bit (RTN int8 g32, Q8_0 blocks) has KL <= llama.cpp's Q8_0",
              a["kl"] <= b["kl"], f"KL {kl3(a['kl'])} vs {kl3(b['kl'])} at {a['bpp']:.3f} vs {b['bpp']:.3f} bits/param")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compactgpt.app.report import place_labels

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5.5), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        pts = m["points"]
        groups = {
            "CompactGPT mix (--bits-per-weight)": ([p for p in pts if p["key"].startswith("gptq4k-mix")], "C3", "o-"),
            "CompactGPT uniform": ([p for p in pts if p["origin"] == "CompactGPT" and "mix" not in p["key"]
                                    and "midpoint" not in p["key"]], "C0", "s"),
            "CompactGPT midpoint grid (before)": ([p for p in pts if "midpoint" in p["key"]], "C7", "x"),
            "llama.cpp": ([p for p in pts if p["origin"] == "llama.cpp"], "C2", "^"),
        }
        for label, (group, color, style) in groups.items():
            if group:
                ax.plot([p["bpp"] for p in group], [1e3 * p["kl"] for p in group], style, color=color, label=label,
                        markersize=6)
        ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (GGUF file)")
        ax.set_ylabel("KL from fp32 (1e-3 nats/token, llama-perplexity)")
        ax.set_title(f"{name}: quality per bit")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    for ax, m in zip(axes[0], models.values()):  # labels last: they are placed on the final layout
        named = [p for p in m["points"] if p["origin"] == "llama.cpp"
                 or p["key"] in ("gptq4k-head6", "rtn4-g32-head4", "rtn8-g32", "gptq4k-mix5.5")]
        place_labels(ax, [(p["bpp"], 1e3 * p["kl"]) for p in named],
                     [p["label"].replace("llama.cpp ", "") for p in named], [4.0] * len(named), fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(results: dict) -> str:
    mach = results["machine"]
    lines = ["# Quality per bit: CompactGPT's grids and mixes against llama.cpp's quantizations", "",
             f"Machine: {mach.get('cpu')}, {mach.get('cores')} cores; llama.cpp {results['llamacpp'].get('commit', '?')}. "
             "Every point is a GGUF file; KL divergence from the fp32 GGUF by `llama-perplexity --kl-divergence` on "
             "the model's held-out text (the same tokens for every row), in 1e-3 nats per token; bits per parameter "
             "= 8 x file bytes / parameters (tied head once). Plot: quality_per_bit.png.", "",
             f"Command: `{results['command']}`", ""]
    for name, m in results["models"].items():
        lines += [f"## {name}", "", "| origin | file | bits/param | KL (1e-3) | perplexity |", "| --- | --- | --- | --- | --- |"]
        for p in m["points"]:
            who = "**llama.cpp**" if p["origin"] == "llama.cpp" else p["origin"]
            lines.append(f"| {who} | {p['label']} | {p['bpp']:.3f} | {kl3(p['kl'])} | {p['ppl']:.3f} |")
        lines += ["", "Claims:", ""]
        for c in m["checks"]:
            lines.append(f"- {'holds' if c['holds'] else '**does not hold**'}: {c['claim']} ({c['figures']})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="float model folder (repeat; default runs/pipeline/teacher)")
    p.add_argument("--data", type=Path, default=None, help="prepared data folder (default: the model's own data)")
    p.add_argument("--tokens", type=int, default=0, help="held-out tokens (0: the whole split)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (GPTQ, llama-imatrix)")
    p.add_argument("--ours", default=",".join(OUR_ROWS), help="our rows: " + ", ".join(OURS))
    p.add_argument("--theirs", default=",".join(THEIR_ROWS), help="llama.cpp's rows: " + ", ".join(THEIRS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/gguf"), help="intermediate files, shared with benchmarks.gguf")
    p.add_argument("--llamacpp-cache", type=Path, default=None)
    p.add_argument("--llamacpp-sdist", type=Path, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "quality_per_bit")
    args = p.parse_args(argv)
    unknown = [k for k in args.ours.split(",") if k not in OURS] + [k for k in args.theirs.split(",") if k not in THEIRS]
    if unknown:
        p.error(f"unknown rows {unknown}")
    args.parts, args.rounds, args.reps = "quality", 0, 0

    from benchmarks import write_results
    from compactgpt.machine import machine_info

    setup = llamacpp_setup(args)
    if setup is None:
        return 2
    tools, info = setup
    results = {"machine": machine_info(), "llamacpp": info, "models": {},
               "command": "python -m benchmarks.quality_per_bit " + shlex.join(argv if argv is not None else sys.argv[1:])}
    for model in args.model or [Path("runs/pipeline/teacher")]:
        measured = bench_model(model, args, tools, exact_option())
        pts = points(measured)
        results["models"][model.name] = {"model": measured["model"], "parameters": measured["parameters"],
                                         "points": pts, "checks": checks(pts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out.with_suffix(".png"))
    write_results(args.out, results, to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
