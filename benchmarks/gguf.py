"""CompactGPT's GGUF exports against llama.cpp's own quantizations, measured by llama.cpp's own tools.

For each model (the default pipeline's teacher unless --model; a trained student may be added):

  ours       int4 artifacts made by `compactgpt quantize` (RTN, GPTQ, AWQ; groups of 32 and 128;
             the full grid, so their codes are Q4_0 blocks; embedding / tied head at int8 (Q8_0),
             Q6_K, Q5_0 or int4 (Q4_0)), RTN and GPTQ on the Q4_K grid with a Q6_K or Q5_0 head,
             GPTQ mixes (--bits-per-weight: Q3_K, Q4_K, Q5_0, Q6_K and Q8_0 tensors), and int8 RTN
             g32 (Q8_0 everywhere), each exported with `compactgpt export --format gguf`: the
             artifact's own codes, written as they are.
  llama.cpp  llama-quantize of the fp32 GGUF export: Q3_K_M, Q4_0 (its default mix, and --pure),
             Q4_K_M, Q5_K_M, Q6_K; Q3_K_M, Q4_0, Q4_K_M and Q5_K_M with an importance matrix
             (llama-imatrix on the same calibration windows the calibrated CompactGPT methods
             read, decoded to text); Q8_0.

(a) quality: llama-perplexity on the model's held-out text (the val split, decoded to text): the
    fp32 GGUF's logits saved once (--kl-divergence-base), then every file's mean KL divergence
    from them, perplexity and top-1 agreement ("Same top p"), all with llama.cpp's context of the
    model's n_positions.
(b) speed: llama-bench prompt (pp64) and generation (tg64) tokens/s, 1 and 2 threads, of the
    pairs in SPEED_PAIRS (our Q4_0 files against llama.cpp's Q4_0 of the same fp32 GGUF, its
    default mix and --pure; Q4_K + Q6_K head against Q4_K_M; our mixes against llama.cpp's files
    of about their size), files interleaved round by round so they share the machine's noise;
    medians of every sample.
(c) sizes: file bytes and bits per parameter (8 * bytes / the GPT's parameter count, tied head
    counted once) of every file, with the GGUF types its tensors hold.

llama.cpp's tools are built once from the installed llama-cpp-python's source (benchmarks/llamacpp_tools.py).
Intermediate files (artifacts, GGUF files, logits) go under --work and are reused while they are newer
than what they are made from.

    python -m benchmarks.gguf --model runs/pipeline/teacher [--model runs/pipeline/student-l2] --work runs/gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# key -> (label, method, settings). Symmetric int4 (zero point 8) is what Q4_0 holds; every row
# quantizes the tied embedding / head too, since llama.cpp's files quantize it as well.
OURS: dict[str, tuple[str, str, dict]] = {}
for _method in ("rtn", "gptq", "awq"):
    for _group in (32, 128):
        for _head in (8, 6, 5, 4):
            OURS[f"{_method}4-g{_group}-head{_head}"] = (
                f"{_method.upper()} int4 g{_group}, " + {6: "Q6_K head", 5: "Q5_0 head"}.get(_head, f"int{_head} head"),
                _method,
                {"bits": 4, "group_size": _group, "symmetric": True, "include_embeddings": True,
                 "head_bits": _head if _head != 4 else 0})
OURS["rtn8-g32"] = ("RTN int8 g32 (head int8)", "rtn",
                    {"bits": 8, "group_size": 32, "symmetric": True, "include_embeddings": True})
# llama.cpp's Q4_K grid (quantize --grid k) with a Q6_K head: the types of its Q4_K_M, code for code.
for _method in ("rtn", "gptq"):
    for _head in (6, 5):
        OURS[f"{_method}4k-head{_head}"] = (f"{_method.upper()} Q4_K, Q{_head}_{'K' if _head == 6 else '0'} head",
                                            _method, {"bits": 4, "group_size": 32, "grid": "k",
                                                      "include_embeddings": True, "head_bits": _head})
# Mixed precision (quantize --bits-per-weight B): GPTQ on the Q4_K grid, each matrix (the head too)
# at Q3_K, Q4_K, Q5_0, Q6_K or Q8_0 as its measured KL decides, B stored bits per weight over the
# matrices.
MIX_BUDGETS = (4.5, 4.75, 5.0, 5.25, 5.5, 5.75, 6.0)
for _budget in MIX_BUDGETS:
    OURS[f"gptq4k-mix{_budget:g}"] = (f"GPTQ mix at {_budget:g} bits/weight", "gptq",
                                      {"bits": 4, "group_size": 32, "grid": "k", "include_embeddings": True,
                                       "head_bits": 6, "bits_per_weight": _budget})
# The grid symmetric codes had before every code was used (quantize --grid midpoint), for comparison.
OURS["rtn4-g32-head4-midpoint"] = ("RTN int4 g32, int4 head, midpoint grid", "rtn",
                                   {**OURS["rtn4-g32-head4"][2], "grid": "midpoint"})
OURS["gptq4-g32-head8-midpoint"] = ("GPTQ int4 g32, int8 head, midpoint grid", "gptq",
                                    {**OURS["gptq4-g32-head8"][2], "grid": "midpoint"})
OURS["rtn8-g32-midpoint"] = ("RTN int8 g32 (head int8), midpoint grid", "rtn",
                             {**OURS["rtn8-g32"][2], "grid": "midpoint"})

# key -> (label, llama-quantize type, extra flags, uses the importance matrix)
THEIRS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    "lc-q3_k_m": ("llama.cpp Q3_K_M", "Q3_K_M", (), False),
    "lc-q3_k_m-imatrix": ("llama.cpp Q3_K_M + imatrix", "Q3_K_M", (), True),
    "lc-q4_0": ("llama.cpp Q4_0 (default mix)", "Q4_0", (), False),
    "lc-q4_0-pure": ("llama.cpp Q4_0 --pure", "Q4_0", ("--pure",), False),
    "lc-q4_0-imatrix": ("llama.cpp Q4_0 + imatrix", "Q4_0", (), True),
    "lc-q4_k_m": ("llama.cpp Q4_K_M", "Q4_K_M", (), False),
    "lc-q4_k_m-imatrix": ("llama.cpp Q4_K_M + imatrix", "Q4_K_M", (), True),
    "lc-q5_k_m": ("llama.cpp Q5_K_M", "Q5_K_M", (), False),
    "lc-q5_k_m-imatrix": ("llama.cpp Q5_K_M + imatrix", "Q5_K_M", (), True),
    "lc-q6_k": ("llama.cpp Q6_K", "Q6_K", (), False),
    "lc-q8_0": ("llama.cpp Q8_0", "Q8_0", (), False),
}
# (ours, theirs) timed against each other: the same types (all Q4_0), the default mixes, and our
# mixes (Q3_K / Q5_0 tensors among them) against llama.cpp's files of about their size.
SPEED_PAIRS = [("rtn4-g32-head4", "lc-q4_0-pure"), ("rtn4-g32-head8", "lc-q4_0"), ("gptq4k-head6", "lc-q4_k_m"),
               ("gptq4k-mix4.75", "lc-q4_0"), ("gptq4k-mix4.75", "lc-q3_k_m"), ("gptq4k-mix5.5", "lc-q4_k_m")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shown(path: Path) -> str:
    """A path as results record it: relative to the working directory when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_tool(cmd: list, log_file: Path, stdout_only: bool = False, complete=None, tries: int = 4) -> str:
    """Run one llama.cpp tool, its output kept in `log_file`; returns the output (stdout alone
    with `stdout_only`: where a report is printed apart from the log lines). `complete(output)`
    says whether the report came out whole: llama.cpp's tools print through a logging thread
    that can lose its last lines when the process exits first (seen on a loaded machine), so an
    incomplete run is repeated, up to `tries` times. A failure raises RuntimeError naming the log."""
    cmd = [str(c) for c in cmd]
    log("$ " + shlex.join(cmd))
    for attempt in range(1, tries + 1):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        out = done.stdout + done.stderr
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(out)
        if done.returncode != 0:
            tail = out.strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): {' | '.join(tail)}; "
                               f"see {log_file}")
        result = done.stdout if stdout_only else out
        if complete is None or complete(result):
            log(f"  done in {time.perf_counter() - t0:.1f}s")
            return result
        log(f"  its report came out cut short (try {attempt} of {tries}); running it again")
    raise RuntimeError(f"{Path(cmd[0]).name} printed an incomplete report {tries} times; see {log_file}")


# Quantize settings that make every number a GGUF block stores fp16-exact, so the file decodes to
# the artifact's own weights (the name differs between CompactGPT versions).
EXACT_OPTIONS = ("gguf_exact", "fp16_scales")


def exact_option() -> str | None:
    """The quantize setting of EXACT_OPTIONS this CompactGPT has, or None."""
    from quantize import config_for

    have = {f.name for f in fields(config_for("rtn"))}
    return next((name for name in EXACT_OPTIONS if name in have), None)


# ---------------------------------------------------------------------------------------
# Text for llama.cpp: it reads text and tokenizes it itself


def decode_documents(tokens, tokenizer) -> str:
    """Token ids as text, documents (split at <|endoftext|>) joined by a blank line: llama.cpp's
    perplexity tool does not parse special tokens, so the separator is written as text would be."""
    ids = [int(t) for t in tokens]
    docs, cur = [], []
    for t in ids:
        if t == tokenizer.eot_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return "\n\n".join(tokenizer.decode(d) for d in docs if d)


def stale(out: Path, *inputs: Path) -> bool:
    """Whether `out` must be made (again): missing, or older than a file it is made from."""
    return not out.exists() or any(out.stat().st_mtime < p.stat().st_mtime for p in inputs)


def write_text(path: Path, text: str) -> Path:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path  # unchanged: keeps its time, so what was computed from it stays valid
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------
# Files


def our_files(model: Path, work: Path, calib_samples: int, exact: str | None, threads: int, keys: list[str],
              data: Path | None = None) -> dict:
    """key -> GGUF path of each of our rows: quantize (an artifact made with the same settings is
    reused), then export; `exact` names the setting that makes the GGUF hold the artifact's
    weights exactly, set on every row when this CompactGPT has it."""
    from export import ExportConfig, export
    from quantize import QuantizeConfig, config_for, quantize_folder

    out = {}
    for key in keys:
        label, method, settings = OURS[key]
        settings = dict(settings)
        if exact:
            settings[exact] = True
        config = config_for(method, **settings)
        if config.calibrated:
            config = config.replace(calib_samples=calib_samples)
        artifact, exported = work / "artifacts" / key, work / "exports" / key
        manifest = artifact / "manifest.json"
        made = json.loads(manifest.read_text()).get("settings", {}) if manifest.is_file() else None
        # module_bits is what a mix chose (saved), not a setting asked for
        if made is None or any(made.get(k) != v for k, v in config.to_dict().items() if k != "module_bits"):
            log(f"quantizing {key} ({label})")
            quantize_folder(QuantizeConfig(model=str(model), out=str(artifact), method=config, progress=False,
                                           data=str(data) if data else None, threads=threads, overwrite=True),
                            log=log)
        if not (exported / "manifest.json").is_file() or \
                (exported / "manifest.json").stat().st_mtime < manifest.stat().st_mtime:
            log(f"exporting {key} to GGUF")
            export(ExportConfig(model=str(artifact), out=str(exported), format="gguf", threads=threads,
                                overwrite=True), log=log)
        out[key] = exported / "model.gguf"
    return out


def fp32_gguf(model: Path, work: Path, threads: int) -> Path:
    from export import ExportConfig, export

    exported = work / "exports" / "fp32"
    if not (exported / "manifest.json").is_file():
        log("exporting the fp32 GGUF")
        export(ExportConfig(model=str(model), out=str(exported), format="gguf", gguf_type="f32", threads=threads,
                            overwrite=True), log=log)
    return exported / "model.gguf"


def calibration_text(model: Path, work: Path, calib_samples: int, data: Path | None = None) -> tuple[Path, dict]:
    """The windows the calibrated methods (GPTQ, AWQ) read, decoded to text for llama-imatrix."""
    from compactgpt.artifacts import load_model
    from quantize import config_for, resolve_calibration

    loaded = load_model(model)
    calib = resolve_calibration(loaded, config_for("gptq", calib_samples=calib_samples), str(data) if data else None)
    text = "\n\n".join(decode_documents(w.tolist(), loaded.tokenizer) for w in calib.ids)
    path = write_text(work / "calibration.txt", text)
    return path, {**calib.describe(), "chars": len(text)}


def imatrix_file(tools: dict, f32: Path, calib: Path, chunks: int, n_ctx: int, work: Path, threads: int) -> Path:
    out = work / "llamacpp" / "imatrix.gguf"
    if stale(out, f32, calib):
        out.parent.mkdir(parents=True, exist_ok=True)
        run_tool([tools["llama-imatrix"], "-m", f32, "-f", calib, "-o", out, "-c", n_ctx, "--chunks", chunks,
                  "-t", threads, "--no-ppl"], work / "logs" / "imatrix.log")
    return out


def their_files(tools: dict, f32: Path, imatrix: Path | None, work: Path, threads: int, keys: list[str]) -> dict:
    out = {}
    for key in keys:
        label, qtype, flags, uses_imatrix = THEIRS[key]
        path = work / "llamacpp" / f"{key}.gguf"
        if stale(path, f32, *([imatrix] if uses_imatrix else [])):
            path.parent.mkdir(parents=True, exist_ok=True)
            extra = ["--imatrix", imatrix] if uses_imatrix else []
            tmp = path.with_name(path.name + ".partial")
            run_tool([tools["llama-quantize"], *flags, *extra, f32, tmp, qtype, threads],
                     work / "logs" / f"{key}.quantize.log")
            tmp.replace(path)
        out[key] = path
    return out


def tensor_types(path: Path) -> dict:
    """Counts of the GGUF types a file's tensors hold, and the token embedding's (the tied head's)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts: dict[str, int] = {}
    embd = None
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        if t.name == "token_embd.weight":
            embd = name
        if t.name == "output.weight":
            counts["(separate output)"] = 1
    return {"counts": dict(sorted(counts.items())), "token_embd": embd}


# ---------------------------------------------------------------------------------------
# (a) quality


def kld_complete(out: str) -> bool:
    return all(re.search(p, out) for p in (r"Mean PPL\(Q\)\s*:", r"Mean\s+KLD:", r"Median\s+KLD:",
                                              r"99\.0%\s+KLD:", r"Same top p:\s*[\d.]"))


def parse_kld(out: str) -> dict:
    def num(pattern: str) -> float | None:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None

    r = {"perplexity": num(r"Mean PPL\(Q\)\s*:\s*([-\d.eE+]+)"),
         "base_perplexity": num(r"Mean PPL\(base\)\s*:\s*([-\d.eE+]+)"),
         "kl_mean": num(r"Mean\s+KLD:\s*([-\d.eE+]+)"),
         "kl_median": num(r"Median\s+KLD:\s*([-\d.eE+]+)"),
         "kl_p99": num(r"99\.0%\s+KLD:\s*([-\d.eE+]+)"),
         "kl_max": num(r"Maximum KLD:\s*([-\d.eE+]+)"),
         "top1_agreement": num(r"Same top p:\s*([-\d.eE+]+)")}
    if r["kl_mean"] is None or r["top1_agreement"] is None:
        raise RuntimeError("llama-perplexity printed no KL statistics")
    r["top1_agreement"] /= 100  # printed in percent
    return r


def quality(tools: dict, f32: Path, files: dict, val_txt: Path, n_ctx: int, work: Path, threads: int,
            force: bool) -> tuple[dict, dict]:
    """The fp32 base run (its perplexity, chunks), then each file's KL statistics against it."""
    base = work / "llamacpp" / "base.kld"
    base_log = work / "logs" / "base.perplexity.log"
    if force or stale(base, f32, val_txt) or not base_log.exists() or "Final estimate: PPL" not in base_log.read_text():
        out = run_tool([tools["llama-perplexity"], "-m", f32, "-f", val_txt, "-c", n_ctx, "-t", threads,
                        "--kl-divergence-base", base], base_log, complete=lambda o: "Final estimate: PPL" in o)
    else:
        out = base_log.read_text()
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    system = re.search(r"system_info: (.*)", out)
    base_info = {"perplexity": float(m.group(1)) if m else None,
                 "system_info": system.group(1).strip().rstrip("|").strip() if system else None,
                 "chunks": int(chunks.group(1)) if chunks else None,
                 "scored_tokens": (int(chunks.group(1)) * (n_ctx - 1 - n_ctx // 2)) if chunks else None,
                 "kld_base_bytes": base.stat().st_size}
    rows = {}
    for key, path in files.items():
        log_file = work / "logs" / f"{key}.kld.log"
        if force or stale(log_file, path, base) or not kld_complete(log_file.read_text(errors="replace")):
            run_tool([tools["llama-perplexity"], "-m", path, "-c", n_ctx, "-t", threads,
                      "--kl-divergence-base", base, "--kl-divergence"], log_file, complete=kld_complete)
        rows[key] = parse_kld(log_file.read_text(errors="replace"))
        log(f"  {key}: KL {rows[key]['kl_mean']:.6f}, PPL {rows[key]['perplexity']:.4f}, "
            f"top-1 {rows[key]['top1_agreement']:.4f}")
    return base_info, rows


def same_tokens(base: Path, text: Path, tokenizer) -> dict:
    """Whether llama.cpp read the held-out text as the same tokens CompactGPT's tokenizer makes of
    it: the base logits file (--kl-divergence-base) begins with the token ids every chunk scored
    ("_logits_", n_ctx, n_vocab, n_chunk, then n_chunk * n_ctx int32 ids)."""
    import numpy as np

    with open(base, "rb") as f:
        head = f.read(20)
        n_ctx, n_vocab, n_chunk = np.frombuffer(head[8:20], dtype=np.int32)
        theirs = np.frombuffer(f.read(4 * int(n_ctx) * int(n_chunk)), dtype=np.int32)
    ours = np.asarray(tokenizer.encode(text.read_text(encoding="utf-8"))[: len(theirs)], dtype=np.int32)
    differ = np.nonzero(ours != theirs[: len(ours)])[0]
    return {"tokens_compared": int(len(theirs)), "equal": bool(len(ours) == len(theirs) and not len(differ)),
            "first_difference": int(differ[0]) if len(differ) else None, "n_vocab": int(n_vocab)}


# ---------------------------------------------------------------------------------------
# (b) speed


def speed(tools: dict, files: dict, pairs: list[tuple[str, str]], rounds: int, reps: int, threads: list[int],
          work: Path) -> dict:
    """llama-bench pp64 / tg64 of every file in `pairs`, files interleaved round by round."""
    order = list(dict.fromkeys(k for pair in pairs for k in pair))
    samples: dict[tuple[str, str, int], list[float]] = {}
    loads = []
    for r in range(rounds):
        for key in order:
            loads.append(os.getloadavg()[0])
            out = run_tool([tools["llama-bench"], "-m", files[key], "-p", 64, "-n", 64,
                            "-t", ",".join(map(str, threads)), "-r", reps, "-o", "json"],
                           work / "logs" / f"{key}.bench.{r}.log", stdout_only=True,
                           complete=lambda o: "[" in o and o.rstrip().endswith("]"))
            for entry in json.loads(out[out.index("["): out.rindex("]") + 1]):
                test = f"pp{entry['n_prompt']}" if entry["n_gen"] == 0 else f"tg{entry['n_gen']}"
                samples.setdefault((key, test, entry["n_threads"]), []).extend(entry["samples_ts"])
    medians = {}
    for (key, test, t), values in samples.items():
        medians.setdefault(key, {})[f"{test}_t{t}"] = {"median": statistics.median(values), "samples": len(values),
                                                        "min": min(values), "max": max(values)}
    ratios = []
    for ours, theirs in pairs:
        for cell in medians[ours]:
            ratios.append({"ours": ours, "theirs": theirs, "test": cell,
                           "ours_tok_s": medians[ours][cell]["median"], "theirs_tok_s": medians[theirs][cell]["median"],
                           "ratio": medians[ours][cell]["median"] / medians[theirs][cell]["median"]})
    return {"rounds": rounds, "reps": reps, "threads": threads, "order": order, "medians": medians,
            "ratios": ratios, "load_average_1min": {"min": min(loads), "max": max(loads)}}


# ---------------------------------------------------------------------------------------
# One model


def describe_row(key: str, work: Path) -> dict:
    """Label, origin and how a file was made: llama-quantize's arguments, or our artifact's
    quantization settings as its manifest records them."""
    if key in THEIRS:
        label, qtype, flags, uses_imatrix = THEIRS[key]
        how = " ".join(["llama-quantize", *flags, *(["--imatrix imatrix.gguf"] if uses_imatrix else []),
                        "fp32.gguf", "out.gguf", qtype])
        return {"label": label, "origin": "llama.cpp", "how": how}
    if key == "fp32":
        return {"label": "fp32 export (the KL base)", "origin": "CompactGPT",
                "how": "compactgpt export --format gguf --gguf-type f32"}
    manifest = json.loads((work / "artifacts" / key / "manifest.json").read_text())
    exported = json.loads((work / "exports" / key / "manifest.json").read_text())
    return {"label": OURS[key][0], "origin": "CompactGPT",
            "how": f"compactgpt quantize --method {OURS[key][1]}, then compactgpt export --format gguf",
            "settings": manifest.get("settings"),
            # the export's read-back check: largest |GGUF-decoded weight - artifact weight| per GGUF type
            "max_weight_change": exported.get("metrics", {}).get("max_weight_change")}


def bench_model(model: Path, args, tools: dict, exact: str | None) -> dict:
    from compactgpt.artifacts import implied_parameters, load_model, read_config
    from compactgpt.calibration import heldout_tokens

    work = args.work / model.name
    (work / "logs").mkdir(parents=True, exist_ok=True)
    config = read_config(model)
    params, n_ctx = implied_parameters(config), config.n_positions
    loaded = load_model(model)
    val_tokens, val_source = heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer,
                                            str(args.data) if args.data else None)
    if args.tokens:
        val_tokens = val_tokens[: args.tokens]
    val_txt = write_text(work / "val.txt", decode_documents(val_tokens.tolist(), loaded.tokenizer))
    del loaded

    parts = set(args.parts.split(","))
    ours_keys, theirs_keys = args.ours.split(","), args.theirs.split(",")
    if "speed" in parts:  # the timed files are made whatever the rows asked for
        ours_keys = list(dict.fromkeys(ours_keys + [o for o, _ in SPEED_PAIRS]))
        theirs_keys = list(dict.fromkeys(theirs_keys + [t for _, t in SPEED_PAIRS]))
    f32 = fp32_gguf(model, work, args.threads)
    calib_txt, calib_info = calibration_text(model, work, args.calib_samples, args.data)
    imatrix = None
    if any(THEIRS[k][3] for k in theirs_keys):
        imatrix = imatrix_file(tools, f32, calib_txt, args.calib_samples, n_ctx, work, args.threads)
    ours = our_files(model, work, args.calib_samples, exact, args.threads, ours_keys, args.data)
    theirs = their_files(tools, f32, imatrix, work, args.threads, theirs_keys)
    files = {**ours, **theirs}

    rows = {}
    for key, path in {"fp32": f32, **files}.items():
        size = path.stat().st_size
        rows[key] = {**describe_row(key, work), "bytes": size, "bits_per_parameter": 8 * size / params,
                     "types": tensor_types(path), "path": shown(path)}

    result = {"model": shown(model), "parameters": params, "n_ctx": n_ctx,
              "val": {"source": val_source, "tokens": int(val_tokens.numel()), "text": shown(val_txt),
                      "text_chars": val_txt.stat().st_size},
              "calibration": {**calib_info, "text": shown(calib_txt), "imatrix_chunks": args.calib_samples},
              "rows": rows}
    if "quality" in parts:
        base, kl = quality(tools, f32, files, val_txt, n_ctx, work, args.threads, args.force)
        from compactgpt.tokenizer import Tokenizer

        base["same_tokens_as_compactgpt"] = same_tokens(work / "llamacpp" / "base.kld", val_txt,
                                                        Tokenizer.from_folder(model))
        result["quality_base"] = base
        for key, r in kl.items():
            rows[key]["quality"] = r
        if "lc-q4_k_m" in rows:
            budget = rows["lc-q4_k_m"]["bytes"]
            fitting = [k for k in ours_keys if OURS[k][2]["bits"] == 4 and rows[k]["bytes"] <= budget]
            result["best_ours_int4_within_q4_k_m_size"] = (
                min(fitting, key=lambda k: rows[k]["quality"]["kl_mean"]) if fitting else None)
    if "speed" in parts:
        result["speed"] = speed(tools, files, SPEED_PAIRS, args.rounds, args.reps, [1, 2], work)
    return result


# ---------------------------------------------------------------------------------------
# Report


# Rows the headline table compares (with our best int4 file at or under Q4_K_M's size).
HEADLINE = ["gptq4-g32-head8", "gptq4-g32-head6", "gptq4k-head6", "lc-q4_0", "lc-q4_0-imatrix", "lc-q4_k_m", "lc-q4_k_m-imatrix", "rtn8-g32", "lc-q8_0"]


def kl3(x: float) -> str:
    """A KL divergence in 1e-3 nats, three significant figures."""
    return f"{1e3 * x:.3g}"


def exactness(result: dict) -> str:
    """One sentence: whether our GGUF files hold the artifacts' weights exactly."""
    changes = [v for m in result["models"].values() for r in m["rows"].values()
               for v in (r.get("max_weight_change") or {}).values()]
    option = result["exact_option"]
    used = (f"quantize setting `{option}` used on every row" if option
            else "this CompactGPT has no quantize setting for fp16-exact scales")
    worst = f"largest |GGUF weight - artifact weight| {max(changes):.3g}" if changes else "no export check recorded"
    return (f"Our GGUF files against our artifacts (the export's read-back check): {worst}; {used} "
            f"(symmetric grids store only an fp16 scale per block).")


def to_markdown(result: dict) -> str:
    from compactgpt.machine import describe

    lc = result["llamacpp"]
    lines = [
        "# CompactGPT's GGUF exports against llama.cpp's own quantizations",
        "",
        f"Machine: {describe(result['machine'])}. llama.cpp: the tree vendored by llama-cpp-python "
        f"{lc.get('version')} (commit {lc.get('commit', 'unknown')[:12]}), its tools built with "
        f"`{' '.join(lc.get('cmake_options', []))}`. {exactness(result)}",
        f"Command: `{result['command']}`",
        "",
        "**Ours** (origin CompactGPT): `compactgpt quantize` artifacts exported code for code with `compactgpt "
        "export --format gguf`: int4 on the full grid (Q4_0 blocks) or on llama.cpp's Q4_K grid (`--grid k`, Q4_K "
        "blocks), the tied embedding / head at int4, Q5_0 (`--head-bits 5`), Q6_K (`--head-bits 6`) or int8 "
        "(Q8_0); mixes chosen by `--bits-per-weight` (Q3_K, Q4_K, Q5_0, Q6_K and Q8_0 tensors); int8 (Q8_0); "
        "rows marked midpoint grid use the grid before `--grid full`. **llama.cpp's** (origin llama.cpp): `llama-quantize` of our fp32 GGUF "
        "export; the importance matrix is `llama-imatrix` on the same calibration windows our GPTQ / AWQ read.",
    ]
    for name, m in result["models"].items():
        rows = m["rows"]
        lines += ["", f"## {name}", "",
                  f"Model `{m['model']}`: {m['parameters']:,} parameters, context {m['n_ctx']}. Held-out text: "
                  f"{m['val']['source']}, {m['val']['tokens']:,} tokens decoded to text. Calibration: "
                  f"{m['calibration']['samples']} windows x {m['calibration']['seq_len']} tokens of the "
                  f"{m['calibration']['source']}."]
        headline = [k for k in HEADLINE if k in rows and "quality" in rows[k]]
        best = m.get("best_ours_int4_within_q4_k_m_size")
        if best and best not in headline:
            headline.insert(1, best)
        if headline:
            lines += ["", "Headline (KL from the fp32 GGUF, 1e-3 nats; file size):", "",
                      "| origin | file | KL mean (1e-3) | top-1 | bits/param | bytes |", "| --- | --- | --- | --- | --- | --- |"]
            for k in headline:
                r = rows[k]
                who = "**llama.cpp**" if r["origin"] == "llama.cpp" else "ours"
                note = " (our best int4 at or under Q4_K_M's size)" if k == best else ""
                lines.append(f"| {who} | {r['label']}{note} | {kl3(r['quality']['kl_mean'])} | "
                             f"{r['quality']['top1_agreement']:.4f} | {r['bits_per_parameter']:.2f} | {r['bytes']:,} |")
        if "quality_base" in m:
            b = m["quality_base"]
            lines += ["", "### (a) Quality: llama-perplexity against the fp32 GGUF", "",
                      f"llama.cpp's CPU features: `{b.get('system_info')}`.", "",
                      f"`llama-perplexity -c {m['n_ctx']} -t 2`: {b['chunks']} chunks, the second half of each "
                      f"scored ({b['scored_tokens']:,} tokens); fp32 GGUF perplexity {b['perplexity']:.4f}. KL: mean "
                      "KL divergence of each file's next-token distributions from the fp32 file's, in 1e-3 nats; "
                      "top-1: share of tokens whose most likely next token is the fp32 file's. Sorted by KL. "
                      f"llama.cpp read the text as the same tokens CompactGPT's tokenizer makes of it: "
                      f"{'yes' if b['same_tokens_as_compactgpt']['equal'] else 'no'} "
                      f"({b['same_tokens_as_compactgpt']['tokens_compared']:,} tokens compared).",
                      "", "| origin | file | KL mean (1e-3) | KL median (1e-3) | KL p99 (1e-3) | top-1 | perplexity | bits/param |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            ranked = sorted((k for k in rows if "quality" in rows[k]), key=lambda k: rows[k]["quality"]["kl_mean"])
            for k in ranked:
                r, q = rows[k], rows[k]["quality"]
                who = "**llama.cpp**" if r["origin"] == "llama.cpp" else "ours"
                lines.append(f"| {who} | {r['label']} | {kl3(q['kl_mean'])} | {kl3(q['kl_median'])} | "
                             f"{kl3(q['kl_p99'])} | {q['top1_agreement']:.4f} | {q['perplexity']:.4f} | "
                             f"{r['bits_per_parameter']:.2f} |")
            if best:
                lines += ["", f"Best of ours at or under llama.cpp's Q4_K_M file size "
                          f"({rows['lc-q4_k_m']['bytes']:,} bytes): {rows[best]['label']}."]
        if "speed" in m:
            s = m["speed"]
            lines += ["", "### (b) Speed: llama-bench", "",
                      f"`llama-bench -p 64 -n 64 -t 1,2 -r {s['reps']}`, {s['rounds']} rounds with the files "
                      f"interleaved ({', '.join(s['order'])}); medians of all {s['rounds'] * s['reps']} samples, "
                      f"tokens/s. 1-minute load average during the runs: {s['load_average_1min']['min']:.2f} to "
                      f"{s['load_average_1min']['max']:.2f} (the machine is shared: compare within a row)."
                      + (" The load was at or above the core count: the 2-thread runs waited for a core (llama.cpp's "
                         "threads meet at spinning barriers), so only the 1-thread rows compare the kernels."
                         if s["load_average_1min"]["min"] >= result["machine"]["cores"] else ""),
                      "", "| ours | llama.cpp's | test | ours tok/s | llama.cpp tok/s | ours / llama.cpp |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for r in s["ratios"]:
                lines.append(f"| {rows[r['ours']]['label']} | {rows[r['theirs']]['label']} | {r['test']} | "
                             f"{r['ours_tok_s']:.1f} | {r['theirs_tok_s']:.1f} | {r['ratio']:.3f} |")
        lines += ["", "### (c) Sizes", "",
                  f"Bits per parameter: 8 x file bytes / {m['parameters']:,} (the tied head counted once; the "
                  "file also holds the tokenizer).", "",
                  "| origin | file | bytes | bits/param | token_embd (tied head) | tensor types |", "| --- | --- | --- | --- | --- | --- |"]
        for k in sorted(rows, key=lambda k: rows[k]["bytes"]):
            r = rows[k]
            who = "**llama.cpp**" if r["origin"] == "llama.cpp" else "ours"
            types = ", ".join(f"{t} {n}" for t, n in r["types"]["counts"].items())
            lines.append(f"| {who} | {r['label']} | {r['bytes']:,} | {r['bits_per_parameter']:.2f} | "
                         f"{r['types']['token_embd']} | {types} |")
    return "\n".join(lines) + "\n"


def llamacpp_setup(args) -> tuple[dict, dict] | None:
    """PyTorch at args.threads, and llama.cpp's tools (built once) with what they were built from
    (`llamacpp_info`, the tool paths left out); None, the error printed, when they cannot be built."""
    import torch

    from benchmarks.llamacpp_tools import llamacpp_info, llamacpp_tools
    from compactgpt.errors import CompactGPTError

    torch.set_num_threads(args.threads)
    try:
        tools = llamacpp_tools(args.llamacpp_cache, log=log, sdist=args.llamacpp_sdist)
    except CompactGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    info = llamacpp_info(tools)
    info.pop("tools", None)
    return tools, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Reads llama.cpp's tools from benchmarks/llamacpp_tools.py (built once).")
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="float model folder (repeat for a teacher and a student; default runs/pipeline/teacher)")
    p.add_argument("--data", type=Path, default=None,
                   help="prepared data folder: its train split calibrates GPTQ / AWQ / llama-imatrix, its val "
                        "split is the held-out text (default: the data the model was trained on)")
    p.add_argument("--tokens", type=int, default=0, help="held-out tokens (0: the whole split)")
    p.add_argument("--calib-samples", type=int, default=128,
                   help="calibration windows of GPTQ / AWQ and of llama-imatrix (chunks)")
    p.add_argument("--parts", default="quality,speed", help="quality, speed (sizes are always written)")
    p.add_argument("--ours", default=",".join(OURS), help="our rows (default: all): " + ", ".join(OURS))
    p.add_argument("--theirs", default=",".join(THEIRS), help="llama.cpp's rows (default: all): " + ", ".join(THEIRS))
    p.add_argument("--rounds", type=int, default=3, help="llama-bench rounds, files interleaved")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions per round (-r)")
    p.add_argument("--threads", type=int, default=2, help="threads of quantization, llama-quantize and llama-perplexity")
    p.add_argument("--work", type=Path, default=Path("runs/gguf"), help="intermediate files (reused when present)")
    p.add_argument("--llamacpp-cache", type=Path, default=None, help="where llama.cpp's tools are built")
    p.add_argument("--llamacpp-sdist", type=Path, default=None,
                   help="llama-cpp-python source distribution to build the tools from (default: download)")
    p.add_argument("--force", action="store_true", help="rerun llama-perplexity even where its log is kept")
    p.add_argument("--out", type=Path, default=RESULTS / "gguf", help="results (.json and .md)")
    args = p.parse_args(argv)
    unknown = [k for k in args.ours.split(",") if k not in OURS] + [k for k in args.theirs.split(",") if k not in THEIRS]
    if unknown:
        p.error(f"unknown rows {unknown}; see --help for the rows")

    from benchmarks import write_results
    from benchmarks.llamacpp_tools import installed_version
    from compactgpt.machine import machine_info

    setup = llamacpp_setup(args)
    if setup is None:
        return 2
    tools, info = setup
    exact = exact_option()
    models = args.model or [Path("runs/pipeline/teacher")]
    result = {"machine": machine_info(), "llamacpp": {**info, "installed_llama_cpp_python": installed_version()},
              "exact_option": exact, "exact_option_used": exact is not None, "models": {},
              "command": "python -m benchmarks.gguf " + shlex.join(argv if argv is not None else sys.argv[1:])}
    for model in models:
        result["models"][model.name] = bench_model(model, args, tools, exact)
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
