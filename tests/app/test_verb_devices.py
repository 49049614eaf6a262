"""Every verb that runs a PyTorch model takes --device: it runs with --device cpu, and on a
machine without a GPU refuses --device cuda with one line and exit status 2, before any work.
The `gpu` tests (pytest -m gpu) run the same verbs on CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from compactgpt.app.cli import main
from compactgpt.artifacts import read_manifest, save_model
from distill import PruneConfig

from conftest import random_gpt

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_dir, tokenizer):
    """A tiny teacher trained on data_dir (by its manifest), a quantized copy and a classifier."""
    from compactgpt.finetune.classify import GPTClassifier, save_classifier

    root = tmp_path_factory.mktemp("devices")
    teacher = root / "teacher"
    save_model(teacher, random_gpt(4, n_layer=3), tokenizer, stage="pretrain", settings={"data": str(data_dir)},
               parent=data_dir)
    assert main(["quantize", "--model", str(teacher), "--out", str(root / "rtn"), "--method", "rtn",
                 "--no-progress"]) == 0
    labels = root / "labels.tsv"
    labels.write_text("".join(f"{'spam' if i % 3 == 0 else 'ham'}\tmessage {i} here\n" for i in range(40)))
    save_classifier(root / "clf", GPTClassifier(random_gpt(5, vocab_size=tokenizer.vocab_size), 2), tokenizer,
                    ["ham", "spam"], stage="finetune",
                    settings={"task": "classify", "data": str(labels), "val_fraction": 0.25})
    return {"root": root, "teacher": teacher, "rtn": root / "rtn", "clf": root / "clf", "data": data_dir}


def _argv(verb: str, f: dict, out) -> list[str]:
    """The smallest run of each verb on the fixtures; `out` is where it may write."""
    t, calib = str(f["teacher"]), ["--calib-samples", "2", "--calib-seq-len", "16", "--eval-tokens", "200"]
    return {
        "prune": ["prune", "--model", t, "--out", str(out), "--layers", "2", "--no-progress", *calib],
        "sparsify": ["sparsify", "--model", t, "--out", str(out), "--no-progress", *calib],
        "quantize": ["quantize", "--model", t, "--out", str(out), "--method", "gptq", "--group-size", "16",
                     "--calib-samples", "4", "--calib-seq-len", "16", "--no-progress"],
        "eval": ["eval", "--model", t, "--reference", str(f["rtn"]), "--max-length", "32", "--json"],
        "generate": ["generate", "--model", str(f["rtn"]), "--prompt", "def ", "--max-new-tokens", "3",
                     "--temperature", "0"],
        "classify": ["classify", "--model", str(f["clf"]), "--text", "message 3 here"],
        "bench": ["bench", "--models", t, str(f["rtn"]), str(f["clf"]), "--data", str(f["data"]), "--out", str(out),
                  "--eval-tokens", "200", "--prompt-tokens", "4", "--new-tokens", "3", "--batch-sizes", "1",
                  "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-memory", "--no-progress"],
    }[verb]


VERBS = ["prune", "sparsify", "quantize", "eval", "generate", "classify", "bench"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_model_verb_runs_with_device_cpu(verb, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(verb, folders, out) + ["--device", "cpu"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    if verb in ("prune", "sparsify", "quantize"):
        # Where a stage ran is not a property of what it wrote: no device in the saved settings.
        assert "device" not in read_manifest(out).settings
    if verb == "bench":
        report = json.loads((out / "report.json").read_text())
        assert "device" not in report["settings"]  # the device is each row's, not a setting
        assert {r["name"]: r["device"] for r in report["rows"]} == {"teacher": "cpu", "rtn": "cpu"}
        assert [c["device"] for c in report["classifiers"]] == ["cpu"]
    if verb == "generate":
        assert printed.startswith("def ")


@no_gpu
@pytest.mark.parametrize("verb", VERBS)
def test_every_model_verb_refuses_cuda_without_a_gpu_in_one_line(verb, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(verb, folders, out) + ["--device", "cuda"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device" in lines[0], captured.err
    assert captured.out == "" and not out.exists()


def test_device_changes_no_saved_setting_and_no_pipeline_fingerprint():
    from compactgpt.app.pipeline.stages import fingerprint

    a = PruneConfig(model="m", out="o", layers=2)
    b = PruneConfig(model="m", out="o", layers=2, device="cpu")
    assert a.to_dict() == b.to_dict() and "device" not in a.to_dict()
    assert PruneConfig.from_dict({"model": "m", "out": "o", "device": "cpu"}).device == "cpu"
    assert fingerprint("prune", a.to_dict(), []) == fingerprint("prune", b.to_dict(), [])


# ---------------------------------------------------------------------------------------
# On a GPU (pytest -m gpu)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("verb", VERBS)
def test_every_model_verb_runs_with_device_cuda(verb, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(verb, folders, out) + ["--device", "cuda"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out
    if verb == "bench":
        rows = json.loads((out / "report.json").read_text())["rows"]
        assert {r["device"] for r in rows} == {"cuda:0"}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("verb", ["eval", "generate", "classify"])
def test_cuda_and_cpu_give_the_same_answers(verb, folders, capsys):
    printed = {}
    for device in ("cpu", "cuda"):
        assert main(_argv(verb, folders, None) + ["--device", device]) == 0
        printed[device] = capsys.readouterr().out
    if verb == "eval":
        cpu, cuda = json.loads(printed["cpu"]), json.loads(printed["cuda"])
        assert cuda["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4)
        assert cuda["kl_mean"] == pytest.approx(cpu["kl_mean"], rel=1e-2, abs=1e-6)
    elif verb == "generate":
        assert printed["cuda"] == printed["cpu"]  # greedy decoding of a random model: well separated logits
    else:
        assert printed["cuda"].split("\t")[0] == printed["cpu"].split("\t")[0]
