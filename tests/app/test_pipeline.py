"""compactgpt pipeline: validation before any work, fingerprints, skip / rerun / restart."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from compactgpt.app.cli import main
from compactgpt.app.pipeline import RECORD, default_config_path, fingerprint, load_config, plan, run_pipeline
from compactgpt.errors import ConfigError


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


def binding_version(monkeypatch, version: str | None) -> None:
    """Make the installed llama-cpp-python look like `version` (None: not installed)."""
    from importlib import metadata

    real = metadata.version

    def fake(name):
        if name != "llama-cpp-python":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", fake)


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
    for name in ("default", "gpu", "gpu-124m"):
        stages = plan(load_config(default_config_path(name)), tmp_path / name, log=quiet)
        kinds = [s.kind for s in stages]
        assert kinds[:2] == ["corpus", "pretrain"] and kinds[-1] == "report"
        assert {"prune", "distill", "quantize", "export", "measure"} <= set(kinds)


# The plan of tiny_config("corpus") as CompactGPT planned it before the planners were split by
# stage group (name, kind, folder under OUT, parents, trains, model, fingerprint[:16]). A
# fingerprint that changes makes every existing run folder of that stage rerun.
TINY_PLAN = [
    ("corpus", "corpus", "data", [], False, None, "d03af6113e74f6c9"),
    ("teacher", "pretrain", "teacher", ["corpus"], True, "teacher", "85c4328c2f53e2aa"),
    ("s/prune", "prune", "students/s/pruned", ["teacher"], False, None, "d84f4374bdceeacc"),
    ("s/distill", "distill", "students/s/distilled", ["teacher", "s/prune"], True, "s", "5aeb5b7ae7c713c8"),
    ("teacher-int8", "quantize", "quantized/teacher-int8", ["teacher"], False, "teacher-int8", "9799299105ec91bb"),
    ("s-int4", "quantize", "quantized/s-int4", ["s/distill"], False, "s-int4", "e9d8f3bc7b00d917"),
    ("teacher-onnx", "export", "onnx/teacher", ["teacher"], False, "teacher-onnx", "bdc045703ef22acc"),
    ("s-int4-onnx", "export", "onnx/s-int4", ["s-int4"], False, "s-int4-onnx", "3a13e8a760661376"),
    ("bench/teacher-onnx", "measure", "bench/teacher-onnx", ["teacher-onnx"], False, None, "c778a7ebfae8b9b4"),
    ("bench/s-int4-onnx", "measure", "bench/s-int4-onnx", ["s-int4-onnx", "teacher-onnx"], False, None,
     "a0be200ee32fc104"),
    ("bench/teacher-int8", "measure", "bench/teacher-int8", ["teacher-int8", "teacher-onnx"], False, None,
     "b85f36dc517ae471"),
    ("report", "report", "report", ["bench/teacher-onnx", "bench/s-int4-onnx", "bench/teacher-int8"], False, None,
     "d20c410040217535"),
]


def test_plan_matches_the_pinned_stages(tmp_path):
    stages = plan(tiny_config("corpus"), tmp_path, log=quiet)
    got = [(s.name, s.kind, s.folder.relative_to(tmp_path.resolve()).as_posix(), s.parents, s.trains, s.model,
            s.fingerprint[:16]) for s in stages]
    assert got == TINY_PLAN


def test_finetuned_teacher_stands_in_for_the_teacher(tmp_path):
    cfg = {**tiny_config("corpus"), "finetune": {"task": "lm", "data": "domain.txt", "max_steps": 3}}
    stages = {s.name: s for s in plan(cfg, tmp_path, log=quiet)}
    assert stages["teacher"].model is None and stages["teacher-ft"].model == "teacher"
    assert stages["teacher-ft"].parents == ["teacher"] and stages["s/distill"].parents == ["teacher-ft", "s/prune"]
    assert stages["teacher-int8"].parents == ["teacher-ft"]
    pinned = {"teacher-ft": "9157ba64e54e01e5", "s/prune": "7153638d9e045d7b", "s/distill": "ef97b61f2f8eb62c"}
    assert {name: stages[name].fingerprint[:16] for name in pinned} == pinned


# The default config gained its GGUF exports and their bench rows after runs were made with it:
# its 30 earlier stages kept their fingerprints except the report's (its list of rows). The
# quantize stages (and what comes after them) changed theirs when symmetric grids began to use
# every code (quantize's `grid`, config version 2): their artifacts are made again.
@pytest.mark.parametrize("name, stages, digest", [("default", 36, "ce18c0fc6b6e68fe"),
                                                  ("gpu", 18, "2da25b4faac6ca9f")])
def test_shipped_configs_keep_their_fingerprints(tmp_path, name, stages, digest, monkeypatch):
    """Run folders made by the shipped configs before are still recognised as up to date."""
    binding_version(monkeypatch, None)  # GGUF rows' fingerprints name the llama.cpp binding here
    planned = plan(load_config(name), tmp_path, log=quiet)
    assert len(planned) == stages
    assert hashlib.sha256(" ".join(s.fingerprint for s in planned).encode()).hexdigest()[:16] == digest


def test_deploy_group_bundles_exports_and_is_skipped_when_up_to_date(tmp_path, corpus_dir):
    cfg = tiny_config(str(corpus_dir))
    cfg = {**{k: cfg[k] for k in ("corpus", "teacher")}, "export": {"models": ["teacher"]},
           "deploy": [{"models": ["teacher-onnx"], "target": "mobile", "check": "always"}],
           "bench": {**cfg["bench"], "models": ["teacher-onnx"]}}
    out = tmp_path / "p"
    stages, first = run_pipeline(cfg, out, log=quiet, progress=False)
    assert first["deploy/mobile/teacher-onnx"].startswith("ran")
    bundle = out / "deploy" / "mobile" / "teacher-onnx"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "model.ort").is_file() and manifest["metrics"]["ort_tokens_match"] is True
    _, again = run_pipeline(cfg, out, log=quiet, progress=False)
    assert again["deploy/mobile/teacher-onnx"] == "skipped"
    with pytest.raises(ConfigError, match="not an ONNX export, which --target mobile bundles"):
        plan({**cfg, "deploy": [{"models": ["teacher"], "target": "mobile"}]}, tmp_path / "q", log=quiet)


def test_gguf_exports_sit_beside_onnx_and_rows_follow_the_binding(tmp_path, corpus_dir, monkeypatch):
    """An export group may list several entries, one per format: GGUF exports go to OUT/gguf and
    are known as MODEL-gguf. Where llama-cpp-python is missing their bench rows say so, and
    installing it (another version) measures them again instead of keeping "not measured"."""
    import sys

    pytest.importorskip("gguf")
    cfg = tiny_config(str(corpus_dir))
    cfg["export"] = [cfg["export"], {"models": ["teacher", "s-int4"], "format": "gguf"}]
    cfg["bench"]["models"] = ["teacher-onnx", "teacher-gguf", "s-int4-gguf"]
    cfg["deploy"] = [{"models": ["s-int4-gguf"], "target": "llama.cpp"}]
    with pytest.raises(ConfigError, match="'teacher-onnx' is not a GGUF export, which --target llama.cpp bundles"):
        plan({**cfg, "deploy": [{"models": ["teacher-onnx"], "target": "llama.cpp"}]}, tmp_path / "q", log=quiet)
    out = tmp_path / "p"
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    binding_version(monkeypatch, None)
    _, first = run_pipeline(cfg, out, log=quiet, progress=False)
    assert first["s-int4-gguf"].startswith("ran") and (out / "gguf" / "s-int4" / "model.gguf").is_file()
    manifest = json.loads((out / "gguf" / "s-int4" / "manifest.json").read_text())
    assert manifest["extra"]["tensor_types"]["Q4_0"] > 0
    assert (out / "deploy" / "llama.cpp" / "s-int4-gguf" / "model.gguf").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher-onnx"]
    assert "llama-cpp-python is not installed" in (out / "report" / "report.md").read_text()

    binding_version(monkeypatch, "9.9.9")
    _, plan_now = run_pipeline(cfg, out, log=quiet, progress=False, only_plan=True)
    assert {k for k, v in plan_now.items() if v == "to run"} == {"bench/teacher-gguf", "bench/s-int4-gguf", "report"}
