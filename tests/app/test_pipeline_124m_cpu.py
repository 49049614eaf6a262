"""The CPU side of the 124M run on random GPT-2-124M weights: an existing 124M model as the
teacher, three students (depth, width, depth + width) pruned and briefly distilled, int8 and
int4 (RTN, GPTQ, AWQ) variants, ONNX exports and the benchmark with 2 threads. The weights are
random (nothing can be downloaded here), so only that every stage works at this size is
shown, not its quality."""

from __future__ import annotations

import json

import pytest
import torch

from compactgpt.app.pipeline import run_pipeline

from test_pipeline import quiet

pytestmark = pytest.mark.slow

DISTILL = {"max_steps": 2, "batch_size": 2, "block_size": 128, "eval_interval": 2, "checkpoint_interval": 2,
           "eval_batches": 1, "eval_tokens": 1024, "warmup_steps": 1}
PRUNE = {"calib_windows": 2, "block_size": 256, "eval_tokens": 1024}
CALIB = {"calib_samples": 4, "calib_seq_len": 256}


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf") / "gpt2-124m-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder, safe_serialization=True)  # GPT-2 124M's shape
    tokenizer.save(folder)  # a small tokenizer: its ids are a subset of the 50,257 rows
    return folder


def test_124m_cpu_stages(tmp_path, corpus_dir, gpt2_124m):
    students = [
        {"name": "depth", "prune": {"layers": 6, **PRUNE}, "distill": DISTILL},
        {"name": "width", "prune": {"heads": 8, "mlp": 1536, **PRUNE}, "distill": DISTILL},
        {"name": "both", "prune": {"layers": 6, "heads": 8, "mlp": 1536, **PRUNE}, "distill": DISTILL},
    ]
    cfg = {
        "corpus": {"source": str(corpus_dir), "val_fraction": 0.1},
        "teacher": {"model": str(gpt2_124m)},
        "students": students,
        "quantize": [
            {"name": "int8", "models": ["teacher", "depth"], "method": "rtn", "bits": 8},
            {"name": "rtn4", "models": ["teacher"], "method": "rtn", "bits": 4, "group_size": 128},
            {"name": "gptq4", "models": ["teacher"], "method": "gptq", "bits": 4, "group_size": 128, **CALIB},
            {"name": "awq4", "models": ["teacher"], "method": "awq", "bits": 4, "group_size": 128, **CALIB},
        ],
        "export": {"models": ["teacher", "depth", "width", "both", "depth-int8", "teacher-gptq4"]},
        "bench": {"models": ["teacher-onnx", "depth-onnx", "width-onnx", "both-onnx", "depth-int8-onnx",
                             "teacher-gptq4-onnx", "teacher-rtn4", "teacher-awq4"],
                  "baseline": "teacher-onnx", "eval_tokens": 2048, "prompt_tokens": 16, "new_tokens": 8,
                  "batch_sizes": "1", "warmup": 1, "repeats": 2, "threads": 2, "memory": False},
    }
    out = tmp_path / "p"
    _, outcome = run_pipeline(cfg, out, log=quiet, progress=False)
    assert all(v.startswith("ran") for v in outcome.values())
    teacher = json.loads((out / "teacher" / "manifest.json").read_text())
    assert teacher["metrics"]["parameters"] == 124_439_808
    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("depth-onnx", "width-onnx", "both-onnx"):
        share = rows[name]["parameters"] / rows["teacher-onnx"]["parameters"]
        assert share < 0.75, (name, share)
    # int4 block projections, the 38.6M-parameter embedding left in fp32 (include_embeddings off).
    assert rows["teacher-gptq4-onnx"]["file_bytes"] < rows["teacher-onnx"]["file_bytes"] / 2
