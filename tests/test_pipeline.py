"""compactgpt pipeline: validation before any work, fingerprints, skip / rerun / restart."""

from __future__ import annotations

import copy
import json

import pytest

from compactgpt.cli import main
from compactgpt.errors import ConfigError
from compactgpt.pipeline import RECORD, default_config_path, fingerprint, load_config, plan, run_pipeline


def tiny_config(corpus: str) -> dict:
    return {
        "corpus": {"source": corpus, "vocab_size": 300, "val_fraction": 0.1},
        "teacher": {"preset": "tiny", "max_steps": 6, "eval_interval": 6, "checkpoint_interval": 6, "eval_batches": 2},
        "students": [{"name": "s", "prune": {"layers": 1, "calib_windows": 2, "eval_tokens": 256},
                      "distill": {"max_steps": 2, "batch_size": 2, "block_size": 32, "eval_interval": 2,
                                  "checkpoint_interval": 2, "eval_batches": 1, "eval_tokens": 256, "warmup_steps": 1}}],
        "quantize": [{"name": "int8", "models": ["teacher"], "method": "rtn", "bits": 8},
                     {"name": "int4", "models": ["s"], "method": "rtn", "bits": 4, "group_size": 32}],
        "export": {"models": ["teacher", "s-int4"]},
        "bench": {"models": ["teacher-onnx", "s-int4-onnx", "teacher-int8"], "baseline": "teacher-onnx",
                  "eval_tokens": 256, "prompt_tokens": 4, "new_tokens": 3, "batch_sizes": "1,2", "warmup": 0,
                  "repeats": 1, "threads": 1, "memory": False},
    }


def quiet(_):
    pass


def test_pipeline_skips_reruns_one_branch_and_restarts(tmp_path, corpus_dir):
    out = tmp_path / "p"
    cfg = tiny_config(str(corpus_dir))
    stages, first = run_pipeline(cfg, out, log=quiet, progress=False)
    assert all(v.startswith("ran") for v in first.values())
    report = json.loads((out / "report" / "report.json").read_text())
    assert {r["name"] for r in report["rows"]} == {"teacher-onnx", "s-int4-onnx", "teacher-int8"}
    assert report["headline"] is None or report["headline"]["name"] == "s-int4-onnx"
    assert (out / "report" / "report.md").is_file() and (out / "report" / "pareto.png").is_file()

    _, second = run_pipeline(cfg, out, log=quiet, progress=False)
    assert set(second.values()) == {"skipped"}
    summary = json.loads((out / "pipeline-run.json").read_text())
    assert {r["this_run"] for r in summary["stages"]} == {"skipped"}
    assert all(r["build_seconds"] is not None for r in summary["stages"])  # times of the first run

    changed = copy.deepcopy(cfg)
    changed["quantize"][1]["group_size"] = 16
    _, third = run_pipeline(changed, out, log=quiet, progress=False)
    rerun = {k for k, v in third.items() if v != "skipped"}
    assert rerun == {"s-int4", "s-int4-onnx", "bench/s-int4-onnx", "report"}
    manifest = json.loads((out / "quantized" / "s-int4" / "manifest.json").read_text())
    assert manifest["settings"]["group_size"] == 16

    # An interrupted export: marker left, record still 'running'. It restarts from an empty
    # folder; stages before it stay skipped.
    folder = out / "onnx" / "s-int4"
    (folder / ".incomplete").write_text("interrupted")
    (folder / "stray.bin").write_bytes(b"x")
    rec = json.loads((folder / RECORD).read_text())
    rec["state"] = "running"
    (folder / RECORD).write_text(json.dumps(rec))
    _, fourth = run_pipeline(changed, out, log=quiet, progress=False)
    assert {k for k, v in fourth.items() if v != "skipped"} == {"s-int4-onnx", "bench/s-int4-onnx", "report"}
    assert not (folder / ".incomplete").exists() and not (folder / "stray.bin").exists()

    # A file of a finished artifact changed by hand: that stage is no longer up to date.
    (out / "quantized" / "teacher-int8" / "model.safetensors").write_bytes(b"tampered")
    stages, _ = run_pipeline(changed, out, log=quiet, progress=False, only_plan=True)
    _, fifth = run_pipeline(changed, out, log=quiet, progress=False, only_plan=True)
    assert {k for k, v in fifth.items() if v == "to run"} == {"teacher-int8", "bench/teacher-int8", "report"}


def test_fingerprint_ignores_folders_and_follows_parents():
    a = fingerprint("quantize", {"bits": 4, "out": "/a", "model": "/x"}, ["p1"])
    assert a == fingerprint("quantize", {"model": "/y", "bits": 4, "out": "/b"}, ["p1"])
    assert a != fingerprint("quantize", {"bits": 8, "out": "/a"}, ["p1"])
    assert a != fingerprint("quantize", {"bits": 4, "out": "/a"}, ["p2"])


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(distil={}), r"unknown stage\(s\) \['distil'\]"),
    (lambda c: c["quantize"][0].update(method="rtm"), "unknown quantization method 'rtm'"),
    (lambda c: c["quantize"][0].update(bits=3), "bits=3 is not supported"),
    (lambda c: c["students"][0]["distill"].update(divergence="js"), "divergence 'js' is unknown"),
    (lambda c: c["students"][0].update(sparsity={}), "unknown keys \\['sparsity'\\]"),
    (lambda c: c["export"]["models"].append("nobody"), "unknown model 'nobody'"),
    (lambda c: c["export"].update(dtype="int2"), "dtype 'int2'"),
    (lambda c: c["bench"].update(baseline="s"), "baseline 's' is not among"),
    (lambda c: c["teacher"].update(preset="huge"), "unknown preset 'huge'"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, corpus_dir, edit, message):
    cfg = tiny_config(str(corpus_dir))
    edit(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        plan(load_config(path), tmp_path / "out", log=quiet)
    assert main(["pipeline", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_shipped_configs_plan(tmp_path):
    for name in ("default", "gpu"):
        stages = plan(load_config(default_config_path(name)), tmp_path / name, log=quiet)
        kinds = [s.kind for s in stages]
        assert kinds[:2] == ["corpus", "pretrain"] and kinds[-1] == "report"
        assert {"prune", "distill", "quantize", "export", "measure"} <= set(kinds)
