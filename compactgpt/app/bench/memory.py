"""Peak memory: one child process per artifact opens it and generates once, so each figure
holds that artifact's runtime alone and nothing an earlier measurement left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ...errors import ArtifactError

# Run as `python -c PROBE FOLDER KIND THREADS PROMPT NEW DEVICE`; prints one JSON line (KiB).
PROBE = r"""
import importlib, json, sys
folder, kind, threads, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = sys.argv[6]
import torch
from compactgpt.app.open import open_model
# Only the runtime this artifact needs, so the baseline is what a deployment of it loads.
for module in {"onnx": ["onnxruntime", "export"], "pytorch-quantized": ["quantize.modules", "quantize.artifact"],
               "gguf": ["llama_cpp", "export"]}.get(kind, []):
    importlib.import_module(module)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

base = status("VmRSS")
torch.set_num_threads(threads)
model = open_model(folder, threads, device)
ids = torch.randint(0, 100, (1, prompt))
for _ in model.stream(ids, new):
    pass
gpu = torch.cuda.max_memory_allocated(model.device) // 1024 if model.device.type == "cuda" else None
print(json.dumps({"baseline_kib": base, "end_kib": status("VmRSS"), "peak_kib": status("VmHWM"), "gpu_peak_kib": gpu}))
"""


def peak_memory(folder: Path, kind: str, threads: int, prompt: int, new: int,
                device: torch.device = torch.device("cpu")) -> dict:
    """Resident memory (MiB) of a fresh process that opens the artifact (`kind` as
    `artifact_kind` names it) on `device` and generates once (Linux /proc): its peak (VmHWM),
    the process before the model is opened (interpreter and this artifact's runtime
    imported), and the model's own share (resident growth from opening it to the end of the
    generation); on a GPU also the peak of GPU memory PyTorch allocated. Raises ArtifactError
    when the probe fails."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(folder), kind, str(threads), str(prompt), str(new),
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
