"""Where an artifact came from: the parent walk, the training data, the held-out text, and
what kind of folder a path is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compactgpt.app.kinds import folder_kind  # with the kind of folder every stage writes registered
from compactgpt.artifacts import read_manifest, save_model
from compactgpt.data import TokenShards
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.calibration import heldout_tokens
from compactgpt.lineage import TrainingData, ancestors, require_same_tokenizer, same_tokenizer, training_data
from compactgpt.model import GPT
from compactgpt.tokenizer import train_bpe

from conftest import tiny_config


@pytest.fixture()
def family(tmp_path, data_dir, tokenizer):
    """data -> teacher -> student, each recording its parent."""
    teacher = tmp_path / "teacher"
    save_model(teacher, GPT(tiny_config()), tokenizer, stage="pretrain", settings={"data": str(data_dir)},
               parent=data_dir)
    student = tmp_path / "student"
    save_model(student, GPT(tiny_config(n_layer=1)), tokenizer, stage="distill", settings={}, parent=teacher)
    return data_dir, teacher, student


def test_ancestors_newest_first_to_the_data(family):
    data, teacher, student = family
    chain = [(p.resolve(), m.stage) for p, m in ancestors(student)]
    assert chain == [(student.resolve(), "distill"), (teacher.resolve(), "pretrain"), (data.resolve(), "data")]
    assert training_data(student) == TrainingData(str(data.resolve()), True)


def test_ancestors_stop_at_a_parent_that_moved(family, tmp_path):
    _, teacher, student = family
    teacher.rename(tmp_path / "elsewhere")
    assert [m.stage for _, m in ancestors(student)] == ["distill"]
    assert training_data(student) is None


def test_heldout_tokens_are_the_data_folders_val_split(family, tokenizer):
    data, _, student = family
    ids, source = heldout_tokens(student, read_manifest(student), tokenizer)
    assert np.array_equal(ids.numpy(), TokenShards(data, "val").all_tokens().astype(np.int64))
    assert source.startswith("val split of")


def test_heldout_tokens_refuse_a_folder_without_training_data(tmp_path, tokenizer):
    save_model(tmp_path / "m", GPT(tiny_config()), tokenizer, stage="pretrain", settings={})
    with pytest.raises(ConfigError, match="records no training data"):
        heldout_tokens(tmp_path / "m", read_manifest(tmp_path / "m"), tokenizer)


def test_tokenizer_comparison(family, tokenizer, corpus_dir):
    data, teacher, _ = family
    assert same_tokenizer(teacher, data) and same_tokenizer(tokenizer, teacher)
    other = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:5]], 280)
    assert not same_tokenizer(other, teacher)
    with pytest.raises(ConfigError, match="different tokenizers"):
        require_same_tokenizer(other, teacher, "different tokenizers; retokenize")


def test_folder_kind_reads_the_folders_own_files(family, tmp_path):
    data, teacher, _ = family
    assert folder_kind(data) == "data" and folder_kind(teacher) == "model"
    for name, edit, kind in (("q", {"quantization_config": {"method": "rtn"}}, "quantized"),
                             ("c", {"architectures": ["GPT2ForSequenceClassification"]}, "classifier")):
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((teacher / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        assert folder_kind(folder) == kind
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "model.onnx").write_bytes(b"")
    assert folder_kind(tmp_path / "o") == "onnx"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not an artifact"):
        folder_kind(tmp_path / "empty")


def test_the_core_registers_only_its_own_folder_kinds():
    """Each stage registers the kind of folder it writes in its own package: the core alone
    knows a model and a data folder, and a stage's kind appears once that stage is imported."""
    import subprocess
    import sys

    code = ("import compactgpt.data, compactgpt.training, compactgpt.lineage\n"
            "from compactgpt.artifacts import FOLDER_KINDS\nprint(sorted(FOLDER_KINDS))\n"
            "import quantize\nprint(sorted(FOLDER_KINDS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["['data', 'model']", "['data', 'model', 'quantized']"]


def test_lineage_survives_moving_the_run_folder(tmp_path, data_dir, tokenizer):
    """Parents are recorded relative to each folder: a run folder moved (or copied to another
    machine) as a whole keeps its lineage."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(data_dir, run / "data")
    save_model(run / "teacher", GPT(tiny_config()), tokenizer, stage="pretrain", settings={}, parent=run / "data")
    save_model(run / "student", GPT(tiny_config(n_layer=1)), tokenizer, stage="distill", settings={},
               parent=run / "teacher")
    assert not str(read_manifest(run / "student").parent["path"]).startswith("/")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    assert [p for p, _ in ancestors(moved / "student")] == [moved / "student", (moved / "teacher").resolve(),
                                                            (moved / "data").resolve()]
    assert training_data(moved / "student").path == str((moved / "data").resolve())


def test_the_nearest_record_of_training_data_decides(family, tmp_path, tokenizer, corpus_dir):
    """A model finetuned on text is calibrated and scored on that text (split as its stage
    split it), not on the data folder its family was pretrained on."""
    data, teacher, _ = family
    tuned = tmp_path / "tuned"
    save_model(tuned, GPT(tiny_config()), tokenizer, stage="finetune", parent=teacher,
               settings={"data": str(corpus_dir), "text_field": "body", "val_fraction": 0.2})
    assert training_data(tuned) == TrainingData(str(corpus_dir), False, "body", 0.2)
    save_model(tmp_path / "q", GPT(tiny_config()), tokenizer, stage="quantize", settings={}, parent=tuned)
    assert training_data(tmp_path / "q") == training_data(tuned)
    ids, source = heldout_tokens(tuned, read_manifest(tuned), tokenizer)
    assert source == f"validation split of {corpus_dir}" and ids.numel() > 0
    # Instructions or labelled examples are not running text: the parent's data counts.
    save_model(tmp_path / "chat", GPT(tiny_config()), tokenizer, stage="finetune", parent=teacher,
               settings={"task": "instruct", "data": str(corpus_dir)})
    assert training_data(tmp_path / "chat") == TrainingData(str(data.resolve()), True)


def test_a_model_copied_without_its_data_names_the_recorded_path(tmp_path, data_dir, tokenizer, capsys):
    """Paths in a manifest are relative to its folder: a copy taken elsewhere without its data
    is told which folder its manifest names, as recorded, and to pass --data."""
    import shutil

    from compactgpt.app.cli import main

    run = tmp_path / "run"
    shutil.copytree(data_dir, run / "data")
    save_model(run / "teacher", GPT(tiny_config()), tokenizer, stage="pretrain", settings={"data": str(run / "data")},
               parent=run / "data")
    copy = tmp_path / "elsewhere" / "deep" / "teacher"
    shutil.copytree(run / "teacher", copy)
    with pytest.raises(ConfigError, match=r"as '\.\./data', which is not there .*pass --data"):
        training_data(copy)
    with pytest.raises(ConfigError, match=r"'\.\./data'"):
        heldout_tokens(copy, read_manifest(copy), tokenizer)
    assert main(["eval", "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "'../data'" in err and "--data" in err and str(copy.parent / "data") in err
    assert main(["eval", "--model", str(copy), "--data", str(data_dir)]) == 0
