"""`compactgpt bench`: every artifact measured the same way, PyTorch or ONNX, float or quantized.

For each model folder: perplexity through the artifact's own runtime (ONNX Runtime for an
ONNX export, PyTorch for a float or quantized artifact, on --device) on the same tokens; parameters and
file size; time to first token, decode tokens/s and prefill tokens/s for a fixed prompt and
length at batch 1 and one larger batch (warm-up runs, repeats, median and p90, fixed
threads); peak resident memory in a separate process per artifact. The machine, library
versions and the exact settings travel with every figure.

    compactgpt bench --models runs/p/teacher-onnx runs/p/student-int4-onnx --data runs/p/data --out runs/p/report

The report (report.md, report.json, PNG plots) is built by `compactgpt.app.report` from
the artifacts' manifests and these measurements alone.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch

from ..artifacts import folder_kind, read_manifest
from ..config import StageConfig, option
from ..data import is_data_folder, random_windows
from ..device import DEVICE_HELP, resolve_device
from ..errors import ArtifactError, ConfigError
from ..lineage import ancestors, data_folder_tokens, same_tokenizer
from ..machine import machine_info
from ..outputs import claim_output
from ..tokenizer import Tokenizer
from .report import build_report, write_report


@dataclass
class BenchConfig(StageConfig):
    """Settings of one benchmark run; saved with every figure."""

    data: str = option("", "prepared data folder whose val split is scored (made with the models' tokenizer, "
                           "e.g. the teacher's data folder)")
    eval_tokens: int = option(32768, "tokens scored for perplexity (0: the whole split)")
    stride: int = option(0, "sliding-window stride (0: half the model's context)")
    prompt_tokens: int = option(64, "prompt length for the speed runs")
    new_tokens: int = option(64, "tokens generated per speed run")
    batch_sizes: str = option("1,8", "comma-separated batch sizes for the speed runs (the first is the headline)")
    warmup: int = option(1, "untimed runs before the timed ones")
    repeats: int = option(5, "timed runs; medians and p90 are over their step times")
    threads: int = option(2, "CPU threads for every runtime (fixed so that figures compare)")
    memory: bool = option(True, "measure peak resident memory in a separate process per artifact")
    seed: int = option(0, "seed that picks the prompt windows from the validation text")
    # Not saved with the settings (saved=False) so that a pipeline's measurements keep their
    # fingerprints; each PyTorch row records the device it ran on instead.
    device: str = option("auto", f"where PyTorch and quantized rows run: {DEVICE_HELP}; ONNX rows run on "
                                 "ONNX Runtime's CPU provider", saved=False)

    def validate(self) -> None:
        resolve_device(self.device)  # a device this machine lacks is refused before any measurement
        if self.eval_tokens < 0 or self.stride < 0:
            raise ConfigError("eval_tokens and stride must be >= 0")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise ConfigError(f"prompt_tokens must be >= 1 and new_tokens >= 2 (decode speed needs two steps); "
                              f"got {self.prompt_tokens}, {self.new_tokens}")
        if self.warmup < 0 or self.repeats < 1 or self.threads < 1:
            raise ConfigError(f"warmup must be >= 0, repeats >= 1, threads >= 1; got {self.warmup}, {self.repeats}, "
                              f"{self.threads}")
        self.batches  # validates the list

    @property
    def batches(self) -> list[int]:
        """The batch sizes of the speed runs; ConfigError for a malformed list."""
        try:
            out = [int(b) for b in str(self.batch_sizes).split(",") if b.strip()]
        except ValueError as e:
            raise ConfigError(f"batch_sizes {self.batch_sizes!r} must be comma-separated integers, e.g. 1,8") from e
        if not out or min(out) < 1:
            raise ConfigError(f"batch_sizes {self.batch_sizes!r} must list positive batch sizes, e.g. 1,8")
        return out


# ---------------------------------------------------------------------------------------
# Timing: pure statistics and the stream timer


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class StreamTiming:
    """Times of generation runs: first-token latency and per-step decode latency."""

    ttft_s: list[float]  # one per timed run: call -> first token
    step_s: list[float]  # every decode step of every timed run: token i-1 -> token i

    def summary(self, batch: int, prompt_tokens: int) -> dict:
        """Medians, p90 and throughputs of these runs at `batch` sequences of `prompt_tokens`."""
        ttft = statistics.median(self.ttft_s)
        step = statistics.median(self.step_s)
        return {
            "batch": batch,
            "ttft_ms_median": ttft * 1e3,
            "ttft_ms_p90": percentile(self.ttft_s, 90) * 1e3,
            "step_ms_median": step * 1e3,
            "step_ms_p90": percentile(self.step_s, 90) * 1e3,
            # Tokens per second across the batch: every step yields one token per sequence.
            "decode_tok_s": batch / step,
            # The first token is the prefill's output: prompt tokens over time to first token.
            "prefill_tok_s": batch * prompt_tokens / ttft,
            "runs": len(self.ttft_s),
            "steps": len(self.step_s),
        }


def device_clock(device: torch.device) -> Callable[[], float]:
    """A clock for work on `device`: CUDA kernels run asynchronously, so the clock waits for
    the device to finish what was queued before it reads the time."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def time_stream(make_stream: Callable[[], Iterator], warmup: int, repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> StreamTiming:
    """Run `make_stream()` to exhaustion warmup + repeats times; time the timed runs.

    The first yield of a run marks the first token (prefill included); each later yield one
    decode step. Raises ConfigError when a run yields fewer than two tokens."""
    ttft: list[float] = []
    steps: list[float] = []
    for run in range(warmup + repeats):
        t0 = clock()
        last = t0
        first = True
        for _ in make_stream():
            now = clock()
            if run >= warmup:
                if first:
                    ttft.append(now - t0)
                else:
                    steps.append(now - last)
            first = False
            last = now
        if run >= warmup and first:
            raise ConfigError("the generation stream yielded no tokens; new_tokens must be >= 1")
    if not steps:
        raise ConfigError("no decode steps were timed; new_tokens must be >= 2")
    return StreamTiming(ttft, steps)


# ---------------------------------------------------------------------------------------
# Runtimes: one registry entry per artifact kind


@dataclass
class MeasuredRuntime:
    """An artifact opened for measurement: how to score it, how to stream from it."""

    kind: str  # pytorch, pytorch-quantized, onnx
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    stream: Callable[..., Iterator]
    n_positions: int
    tokenizer: Tokenizer
    parameters: int | None  # None: counted from the float ancestor (artifact_parameters)
    device: torch.device = torch.device("cpu")  # where the model runs; inputs may come from the CPU


def _torch_stream(model: torch.nn.Module, device: torch.device) -> Callable[..., Iterator]:
    """model.stream taking prompts on the CPU (where they are drawn) and running on `device`."""

    @torch.no_grad()
    def stream(ids: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator:
        yield from model.stream(ids.to(device), max_new_tokens, **kwargs)

    return stream


def _open_torch(folder: Path, threads: int, device: torch.device = torch.device("cpu"),
                quantized: bool = False) -> MeasuredRuntime:
    from ..evaluation import model_logits_fn
    from .open import load_pytorch

    torch.set_num_threads(threads)
    loaded = load_pytorch(folder, "quantized" if quantized else "model", device)
    model = loaded.model.eval()
    # A quantized model holds integer codes: its float ancestor's count comes from artifact_parameters.
    params = None if quantized else sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return MeasuredRuntime("pytorch-quantized" if quantized else "pytorch",
                           torch.no_grad()(model_logits_fn(model, device)), _torch_stream(model, device),
                           model.config.n_positions, loaded.tokenizer, params, device)


def _open_onnx(folder: Path, threads: int, device: torch.device | None = None) -> MeasuredRuntime:
    from export import OnnxDecoder

    # ONNX rows stay on ONNX Runtime's CPU provider whatever --device says (see BenchConfig.device).
    decoder = OnnxDecoder(folder, threads=threads, log=lambda m: None)
    return MeasuredRuntime("onnx", decoder.logits_fn(), decoder.stream, decoder.config.n_positions,
                           decoder.tokenizer, None)


# kind -> opener(folder, threads, device); PyTorch runtimes run on the device, ONNX on the CPU.
RUNTIMES: dict[str, Callable[..., MeasuredRuntime]] = {
    "pytorch": _open_torch,
    "pytorch-quantized": partial(_open_torch, quantized=True),
    "onnx": _open_onnx,
}

# compactgpt.artifacts.folder_kind -> what bench calls the kind (the runtime, for a language model).
_BENCH_KIND = {"model": "pytorch", "quantized": "pytorch-quantized", "onnx": "onnx", "classifier": "classifier"}


def artifact_kind(folder: str | Path) -> str:
    """How bench measures a folder: a RUNTIMES key, or "classifier". ArtifactError for a folder
    that is not a finished CompactGPT model artifact (no manifest, a data folder) or has no
    tokenizer."""
    folder = Path(folder)
    if read_manifest(folder) is None:  # raises for a missing or unfinished folder
        raise ArtifactError(
            f"{folder} has no manifest.json: bench measures CompactGPT artifacts only (their manifest "
            "names the stage, settings and parent); write it with a compactgpt verb"
        )
    kind = folder_kind(folder)
    if kind == "data":
        raise ArtifactError(f"{folder} is a data folder, not a model; pass it as --data and the models as --models")
    if not (folder / "tokenizer.json").is_file():
        if kind == "onnx":
            raise ArtifactError(
                f"{folder} is an ONNX export without tokenizer.json: prompts and perplexity text cannot be "
                "tokenized; re-export it with `compactgpt export`, which copies the tokenizer"
            )
        raise ArtifactError(f"{folder} has no tokenizer.json; rerun the stage that wrote it")
    return _BENCH_KIND[kind]


def file_bytes(folder: str | Path) -> int:
    """Bytes of the files a deployment ships: weights and graphs (manifest, logs and
    checkpoints excluded)."""
    folder = Path(folder)
    names = ("model.safetensors", "model.onnx", "model.onnx.data")
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def _float_parameters(folder: Path) -> int | None:
    """Parameters of a float artifact, read from its safetensors header (tied head counted once)."""
    from safetensors import safe_open

    cfg = folder / "config.json"
    if not (folder / "model.safetensors").is_file() or not cfg.is_file():
        return None
    if "quantization_config" in json.loads(cfg.read_text(encoding="utf-8")):
        return None
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".attn.bias"))


def artifact_parameters(folder: Path, runtime: MeasuredRuntime) -> int | None:
    """Parameters of the model an artifact holds: the runtime's own count, else (a quantized
    or exported artifact) its nearest float ancestor's, found through the manifests."""
    if runtime.parameters:
        return runtime.parameters
    for path, _ in ancestors(folder):
        n = _float_parameters(path)
        if n:
            return n
    return None


# ---------------------------------------------------------------------------------------
# Peak memory: one child process per artifact


_PROBE = r"""
import importlib, json, sys
from pathlib import Path
folder, kind, threads, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = sys.argv[6]
import torch
from compactgpt.app.bench import RUNTIMES
# Only the runtime this artifact needs, so the baseline is what a deployment of it loads.
for module in {"onnx": ["onnxruntime", "export"], "pytorch-quantized": ["quantize.modules", "quantize.artifact"]}.get(kind, []):
    importlib.import_module(module)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

base = status("VmRSS")
rt = RUNTIMES[kind](Path(folder), threads, torch.device(device))
ids = torch.randint(0, 100, (1, prompt))
for _ in rt.stream(ids, new):
    pass
gpu = torch.cuda.max_memory_allocated(rt.device) // 1024 if rt.device.type == "cuda" else None
print(json.dumps({"baseline_kib": base, "end_kib": status("VmRSS"), "peak_kib": status("VmHWM"), "gpu_peak_kib": gpu}))
"""


def peak_memory(folder: Path, kind: str, threads: int, prompt: int, new: int,
                device: torch.device = torch.device("cpu")) -> dict:
    """Resident memory (MiB) of a fresh process that opens the artifact on `device` and
    generates once (Linux /proc): its peak (VmHWM), the process before the model is opened
    (interpreter and this artifact's runtime imported), and the model's own share (resident
    growth from opening it to the end of the generation); on a GPU also the peak of GPU
    memory PyTorch allocated. Raises ArtifactError when the probe fails."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(folder), kind, str(threads), str(prompt), str(new),
                           str(device)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise ArtifactError(f"the memory probe failed on {folder}: {proc.stderr.strip()[-500:]}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"peak_rss_mib": d["peak_kib"] / 1024, "runtime_baseline_rss_mib": d["baseline_kib"] / 1024,
           "model_rss_mib": (d["end_kib"] - d["baseline_kib"]) / 1024}
    if d.get("gpu_peak_kib") is not None:
        out["gpu_peak_mib"] = d["gpu_peak_kib"] / 1024
    return out


# ---------------------------------------------------------------------------------------
# Measuring one artifact


def eval_token_ids(data: str, tokenizer: Tokenizer | str | Path) -> tuple[torch.Tensor, str]:
    """Tokens to score and where they come from: a prepared data folder's val split, which
    must have been made with `tokenizer` (a tokenizer or a folder holding one). Raises
    ConfigError otherwise."""
    path = Path(data)
    if not is_data_folder(path):
        raise ConfigError(f"--data {data} is not a prepared data folder; create one with `compactgpt tokenize` "
                          "using the models' tokenizer (--tokenizer MODEL)")
    problem = (f"{data} was tokenized with a different tokenizer than the model's; benchmark models against a "
               "data folder made with their own tokenizer")
    return data_folder_tokens(path, tokenizer, "the model", problem=problem), f"val split of {path}"


def measure_classifier(folder: Path, config: BenchConfig) -> dict:
    """A classifier artifact: accuracy and macro F1 on the held-out split its finetuning
    stage used (rebuilt from its manifest), and per-example latency at batch 1."""
    from ..finetune.classify import (classifier_max_length, encode_texts, evaluate_examples, heldout_examples,
                                     load_classifier, predict)

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    loaded = load_classifier(folder, device=device)  # predict moves each batch there
    settings = loaded.manifest.settings if loaded.manifest else {}
    if settings.get("task") != "classify" or not settings.get("data"):
        raise ConfigError(f"{folder} records no labelled data to hold out from; benchmark classifiers written "
                          "by `compactgpt finetune --task classify`")
    examples, source = heldout_examples(loaded)
    max_length = classifier_max_length(loaded)
    r = evaluate_examples(loaded.model, loaded.tokenizer, examples, loaded.labels, max_length)
    seqs = encode_texts(loaded.tokenizer, [e.text for e in examples[: max(8, config.repeats)]], max_length)
    for seq in seqs[: config.warmup]:
        predict(loaded.model, [seq], loaded.tokenizer.eot_id, batch_size=1)
    clock = device_clock(device)
    latency = []
    for seq in seqs:
        t = clock()
        predict(loaded.model, [seq], loaded.tokenizer.eot_id, batch_size=1)
        latency.append(clock() - t)
    params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    return {"folder": str(folder), "runtime": "pytorch-classifier", "device": str(device), "parameters": params,
            "file_bytes": file_bytes(folder), "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
            "examples": r["examples"], "eval": {"data": source},
            "latency_ms_median": statistics.median(latency) * 1e3,
            "latency_ms_p90": percentile(latency, 90) * 1e3, "latency_examples": len(latency)}


def measure_speed(rt: MeasuredRuntime, tokens: torch.Tensor, config: BenchConfig) -> list[dict]:
    """Streaming speed at each batch size, on prompts of real validation text (so the decode
    path sees ordinary activations) drawn with the config's seed."""
    gen = torch.Generator().manual_seed(config.seed)
    speed = []
    for batch in config.batches:
        prompt = random_windows(tokens, batch, config.prompt_tokens, gen)
        timing = time_stream(lambda: rt.stream(prompt, config.new_tokens), config.warmup, config.repeats,
                             clock=device_clock(rt.device))
        speed.append(timing.summary(batch, config.prompt_tokens))
    return speed


def _open_reference(reference: str | Path, rt: MeasuredRuntime, threads: int,
                    device: torch.device = torch.device("cpu")) -> MeasuredRuntime | None:
    """The baseline opened for KL (a PyTorch one on `device`), or None when it cannot be
    compared with `rt`: a classifier, another tokenizer, or a context shorter than rt's
    scoring window."""
    kind = artifact_kind(reference)
    if kind == "classifier":
        return None
    ref = RUNTIMES[kind](Path(reference), threads, device)
    if not same_tokenizer(ref.tokenizer, rt.tokenizer) or ref.n_positions < rt.n_positions:
        return None
    return ref


def score(folder: Path, rt: MeasuredRuntime, tokens: torch.Tensor, config: BenchConfig, progress: bool,
          reference: str | Path | None) -> tuple[SimpleNamespace, dict | None]:
    """(perplexity result, divergence from the reference or None). With a comparable reference
    the perplexity comes from the same pass as the KL divergence."""
    from ..evaluation import compare_models, perplexity

    window = rt.n_positions
    itself = reference is not None and Path(reference).resolve() == folder.resolve()
    device = resolve_device(config.device)
    ref = _open_reference(reference, rt, config.threads, device) if reference is not None and not itself else None
    if ref is None:
        ppl = perplexity(rt.logits_fn, tokens, window, config.stride or None, progress=progress)
        if itself:
            return ppl, {"reference": str(reference), "kl_mean": 0.0, "kl_median": 0.0, "kl_p99": 0.0,
                         "top1_agreement": 1.0}
        return ppl, None
    c = compare_models(rt.logits_fn, ref.logits_fn, tokens, window, config.stride or None, progress=progress)
    ppl = SimpleNamespace(perplexity=c.perplexity, nll=math.log(c.perplexity), tokens=c.tokens,
                          max_length=c.max_length, stride=c.stride)
    divergence = {"reference": str(reference), "kl_mean": c.kl_mean, "kl_median": c.kl_median,
                  "kl_p99": c.kl_p99, "top1_agreement": c.top1_agreement}
    del ref
    gc.collect()  # close the reference's runtime now (an ONNX Runtime session's threads spin)
    return ppl, divergence


def measure(folder: str | Path, config: BenchConfig, progress: bool = True, reference: str | Path | None = None) -> dict:
    """Every figure of one artifact (see the module docstring). With `reference` (the baseline
    model), perplexity is measured in the same pass as the KL divergence of the artifact's
    next-token distributions from the reference's; models with another tokenizer or a shorter
    context than the artifact's window get no KL. Raises ArtifactError for a folder bench
    cannot measure, ConfigError for settings that do not fit the model or its data."""
    folder = Path(folder)
    kind = artifact_kind(folder)
    if kind == "classifier":
        return measure_classifier(folder, config)
    gc.collect()  # runtimes of earlier measurements must not share the CPU with this one
    rt = RUNTIMES[kind](folder, config.threads, resolve_device(config.device))
    tokens, source = eval_token_ids(config.data, rt.tokenizer)
    if config.eval_tokens:
        tokens = tokens[: config.eval_tokens]
    if config.prompt_tokens + config.new_tokens > rt.n_positions:
        raise ConfigError(f"prompt_tokens + new_tokens = {config.prompt_tokens + config.new_tokens} exceeds "
                          f"{folder}'s {rt.n_positions} positions; lower them")
    # Speed first: the reference model opened for the KL would share the CPU with it.
    speed = measure_speed(rt, tokens, config)
    ppl, divergence = score(folder, rt, tokens, config, progress, reference)
    record = {
        "folder": str(folder),
        "runtime": kind,
        "device": str(rt.device),
        "parameters": artifact_parameters(folder, rt),
        "file_bytes": file_bytes(folder),
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "eval": {"data": source, "tokens": ppl.tokens, "max_length": ppl.max_length, "stride": ppl.stride},
        "speed": speed,
    }
    if divergence is not None:
        record["divergence"] = divergence
    if config.memory:
        record["memory"] = peak_memory(folder, kind, config.threads, config.prompt_tokens, config.new_tokens,
                                       rt.device)
    return record


# ---------------------------------------------------------------------------------------
# A benchmark run: every model, then the report


def check_models(folders: list[str | Path]) -> list[str]:
    """Each folder's kind (artifact_kind); every bad folder is reported, in one ArtifactError,
    before any measurement."""
    kinds, problems = [], []
    for f in folders:
        try:
            kinds.append(artifact_kind(f))
        except ArtifactError as e:
            problems.append(str(e))
    if problems:
        raise ArtifactError("; ".join(problems))
    return kinds


def write_bench_report(folders: dict[str, str], measurements: dict[str, dict], config: BenchConfig,
                       out: str | Path, baseline: str | None = None, command: str | None = None) -> dict:
    """Build the report of these measurements (with this machine and the config's thread
    count) and write it to `out`; returns the report dict."""
    machine = machine_info()
    machine["torch_threads"] = config.threads
    report = build_report(folders, measurements, config.to_dict(), machine, baseline=baseline, command=command)
    write_report(report, out)
    return report


def _log_measurement(log: Callable[[str], None], m: dict, seconds: float) -> None:
    if "accuracy" in m:
        log(f"  accuracy {m['accuracy']:.4f}, {m['latency_ms_median']:.1f} ms per example  [{seconds:.0f}s]")
    else:
        log(f"  perplexity {m['perplexity']:.3f}, decode {m['speed'][0]['decode_tok_s']:.0f} tok/s (batch "
            f"{m['speed'][0]['batch']}), {m['file_bytes'] / 1e6:.1f} MB  [{seconds:.0f}s]")


def run_bench(folders: list[str | Path], config: BenchConfig, out: str | Path, names: list[str] | None = None,
              baseline: str | None = None, log: Callable[[str], None] = print, progress: bool = True,
              command: str | None = None, overwrite: bool = False) -> dict:
    """Measure every folder, write report.json / report.md / plots to `out`; returns the report
    dict. Every folder and the data are checked before the first measurement (ArtifactError,
    ConfigError), and `out` is claimed (compactgpt.outputs.claim_output: never a measured folder
    or one above it; an earlier report is replaced, another artifact only with overwrite)."""
    with claim_output(out, stage="bench", inputs={"--models": folders, "--data": config.data}, overwrite=overwrite):
        return _run_bench(folders, config, out, names, baseline, log, progress, command)


def _run_bench(folders: list[str | Path], config: BenchConfig, out: str | Path, names: list[str] | None,
               baseline: str | None, log: Callable[[str], None], progress: bool, command: str | None) -> dict:
    kinds = check_models(folders)
    if "classifier" in kinds and all(k == "classifier" for k in kinds):
        raise ConfigError("every model is a classifier; bench needs at least one language model as the baseline")
    if names is None:
        names = [Path(f).name for f in folders]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be distinct, got {names}")
    first_lm = next(f for f, k in zip(folders, kinds) if k != "classifier")
    eval_token_ids(config.data, first_lm)
    if baseline is not None and baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not one of the models {names}")
    reference = folders[names.index(baseline)] if baseline else first_lm
    measurements = {}
    for i, (name, folder) in enumerate(zip(names, folders), 1):
        log(f"[bench {i}/{len(folders)}] {name} ({folder})")
        t = time.perf_counter()
        measurements[name] = measure(folder, config, progress=progress, reference=reference)
        _log_measurement(log, measurements[name], time.perf_counter() - t)
    return write_bench_report(dict(zip(names, map(str, folders))), measurements, config, out,
                              baseline=baseline, command=command)
