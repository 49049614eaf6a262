"""A pipeline whose teacher is an existing GPT-2 model (a folder saved by transformers, as a
hub download would be): no pretraining; the corpus is tokenized with the model's own
tokenizer and serves distillation, calibration and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from compactgpt.app.cli import main
from compactgpt.app.pipeline import plan, run_pipeline
from compactgpt.errors import ConfigError
from compactgpt.lineage import same_tokenizer

from test_pipeline import quiet, tiny_config


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    """A GPT-2 folder written by transformers (config.json + model.safetensors) with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                       n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(folder)
    return folder


def existing_teacher_config(corpus: str, teacher: str) -> dict:
    cfg = tiny_config(corpus)
    cfg["teacher"] = {"model": teacher}
    cfg["quantize"].append({"name": "gptq4", "models": ["teacher"], "method": "gptq", "bits": 4, "group_size": 32,
                            "calib_samples": 4, "calib_seq_len": 32})
    cfg["bench"]["models"].append("teacher-gptq4")
    return cfg


def test_plan_has_no_pretraining(tmp_path, corpus_dir, gpt2_folder, capsys):
    cfg = existing_teacher_config(str(corpus_dir), str(gpt2_folder))
    kinds = {s.name: s.kind for s in plan(cfg, tmp_path / "p", log=quiet)}
    assert "pretrain" not in kinds.values() and kinds["teacher"] == "import"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["pipeline", "--config", str(path), "--out", str(tmp_path / "p"), "--plan"]) == 0
    assert "pretrain" not in capsys.readouterr().out


def test_existing_teacher_runs_to_a_report(tmp_path, corpus_dir, gpt2_folder):
    out = tmp_path / "p"
    cfg = existing_teacher_config(str(corpus_dir), str(gpt2_folder))
    _, outcome = run_pipeline(cfg, out, log=quiet, progress=False)
    assert all(v.startswith("ran") for v in outcome.values())
    assert same_tokenizer(out / "data", gpt2_folder)  # the corpus speaks the teacher's tokenizer
    manifest = json.loads((out / "teacher" / "manifest.json").read_text())
    assert manifest["stage"] == "import" and manifest["metrics"]["val_perplexity"] > 1
    assert manifest["extra"]["source"]["path"].endswith("gpt2-tiny")
    report = json.loads((out / "report" / "report.json").read_text())
    assert {r["name"] for r in report["rows"]} >= {"teacher-onnx", "s-int4-onnx", "teacher-gptq4"}
    # The source folder is an input: never written to.
    assert not (gpt2_folder / "manifest.json").exists()
    _, again = run_pipeline(cfg, out, log=quiet, progress=False)
    assert set(again.values()) == {"skipped"}


def test_existing_teacher_takes_no_training_settings(tmp_path, corpus_dir, gpt2_folder):
    cfg = existing_teacher_config(str(corpus_dir), str(gpt2_folder))
    cfg["teacher"]["max_steps"] = 10
    with pytest.raises(ConfigError, match="cannot be combined with 'model'"):
        plan(cfg, tmp_path / "p", log=quiet)
    cfg["teacher"] = {"model": str(tmp_path / "nowhere")}
    with pytest.raises(Exception, match="does not exist"):
        plan(cfg, tmp_path / "p", log=quiet)
