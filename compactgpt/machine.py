"""What machine a figure came from: CPU model, cores, memory, GPU, library versions."""

from __future__ import annotations

import os
import platform

import torch

from .artifacts import library_versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gib": round(memory_gib() or 0.0, 1),
        "os": f"{platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": library_versions(extra=("onnxruntime-gpu", "onnxruntime", "onnx", "optimum", "bitsandbytes")),
    }
    return info


def describe(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB{gpu}; torch {info['versions'].get('torch')}"
