"""The whole tiny pipeline on a CUDA GPU: every PyTorch stage picks the GPU by itself
(--device auto), artifacts are written in the same format as on a CPU, and the report's
PyTorch rows say they ran on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from compactgpt.app.pipeline import run_pipeline

from test_pipeline import quiet, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tiny_pipeline_runs_on_cuda(tmp_path, corpus_dir):
    cfg = tiny_config(str(corpus_dir))
    cfg["bench"]["models"].append("s")  # a float PyTorch row besides the quantized one
    _, outcome = run_pipeline(cfg, tmp_path / "p", log=quiet, progress=False)
    assert all(v.startswith("ran") for v in outcome.values())
    report = json.loads((tmp_path / "p" / "report" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("teacher-int8", "s"):
        assert str(rows[name].get("device", "")).startswith("cuda"), rows[name]
    teacher_log = [json.loads(line) for line in (tmp_path / "p" / "teacher" / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "train" for r in teacher_log)
    # Saved on the CPU in the usual format: the folder loads anywhere.
    from compactgpt.artifacts import load_model

    assert load_model(tmp_path / "p" / "teacher").model.transformer.wte.weight.device.type == "cpu"
