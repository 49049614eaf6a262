"""One way to call every stage: `stage(config) -> Path`, the config holding every input and
every run setting (device, overwrite, resume, threads, progress), none of which is saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compactgpt.artifacts import read_manifest, save_model
from compactgpt.config import RUN_SETTINGS
from compactgpt.finetune import FinetuneConfig, finetune
from compactgpt.pretrain import AdoptConfig, adopt_teacher, config_from_preset, pretrain
from distill import DistillConfig, PruneConfig, SparsifyConfig, distill, prune, sparsify
from export import ExportConfig, export_onnx
from quantize import QuantizeConfig, RTNConfig, quantize_folder

from conftest import random_gpt

# Every run setting at a value other than its default: none of them may reach the manifest.
RUN = dict(overwrite=True, threads=1, progress=False)
UNSAVED = set(RUN_SETTINGS) | {"device"}
LOOP = dict(max_steps=2, batch_size=2, warmup_steps=1, eval_interval=2, checkpoint_interval=2, log_interval=1)
CALIBRATION = dict(calib_samples=2, calib_seq_len=16, eval_tokens=200)
# The flags every parse of these verbs needs.
REQUIRED = {"finetune": ["--model", "m", "--task", "lm", "--data", "d", "--out", "o"], "quantize": ["--method", "rtn"]}


def quiet(_):
    pass


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("contract") / "teacher"
    save_model(folder, random_gpt(3), tokenizer, stage="pretrain", settings={"data": str(data_dir)}, parent=data_dir)
    return folder


def check(returned, config) -> dict:
    """The stage returned its folder, and the manifest holds no run setting."""
    assert returned == Path(config.out)
    settings = read_manifest(returned).settings
    assert not UNSAVED & set(settings), sorted(UNSAVED & set(settings))
    return settings


def test_pretrain_and_import(tmp_path, data_dir, teacher):
    config = config_from_preset("tiny", data=str(data_dir), out=str(tmp_path / "pre"), n_positions=32, block_size=16,
                                eval_batches=1, device="cpu", resume=True, **RUN, **LOOP)
    check(pretrain(config, log=quiet), config)
    adopted = AdoptConfig(model=str(teacher), data=str(data_dir), out=str(tmp_path / "import"), device="cpu", **RUN)
    assert check(adopt_teacher(adopted, log=quiet), adopted) == {"model": str(teacher), "data": str(data_dir)}


def test_finetune(tmp_path, corpus_dir, teacher):
    config = FinetuneConfig(model=str(teacher), task="lm", data=str(corpus_dir), out=str(tmp_path / "ft"),
                            max_length=16, eval_max_tokens=200, device="cpu", resume=True, **RUN, **LOOP)
    check(finetune(config, log=quiet), config)


def test_prune_sparsify_and_distill(tmp_path, teacher):
    pruned = PruneConfig(model=str(teacher), out=str(tmp_path / "pruned"), layers=1, device="cpu", **RUN,
                         **CALIBRATION)
    check(prune(pruned, log=quiet), pruned)
    sparse = SparsifyConfig(model=str(teacher), out=str(tmp_path / "sparse"), device="cpu", **RUN, **CALIBRATION)
    check(sparsify(sparse, log=quiet), sparse)
    student = DistillConfig(teacher=str(teacher), student=pruned.out, out=str(tmp_path / "student"), block_size=16,
                            eval_batches=1, eval_tokens=200, device="cpu", resume=True, **RUN, **LOOP)
    check(distill(student, log=quiet), student)


def test_quantize_and_export(tmp_path, teacher):
    before = torch.get_num_threads()
    method = RTNConfig(bits=4, group_size=16)
    quantized = QuantizeConfig(model=str(teacher), out=str(tmp_path / "q"), method=method, device="cpu", **RUN)
    # The artifact saves the method's settings, exactly as quantize_(model, config) takes them.
    assert check(quantize_folder(quantized, log=quiet), quantized) == method.versioned_dict()
    # An export validates on ONNX Runtime's CPU provider and draws no progress bars: no device, no progress.
    exported = ExportConfig(model=quantized.out, out=str(tmp_path / "onnx"), overwrite=True, threads=1)
    check(export_onnx(exported, log=quiet), exported)
    assert torch.get_num_threads() == before  # a stage's threads are its own


def test_run_settings_are_flags_of_every_verb():
    from compactgpt.app.cli import build_parser

    for verb in ("pretrain", "finetune", "prune", "sparsify", "distill", "quantize", "export"):
        parser = build_parser(verb)
        needed = REQUIRED.get(verb, [])
        args = parser.parse_args([verb, "--overwrite", "--threads", "2", *needed])
        assert (args.overwrite, args.threads) == (True, 2), verb
        if verb != "export":
            assert parser.parse_args([verb, "--no-progress", "--device", "cpu", *needed]).progress is False
        if verb in ("pretrain", "finetune", "distill"):
            assert parser.parse_args([verb, "--resume", *needed]).resume is True


def test_quantize_config_reads_its_own_dict_back():
    config = QuantizeConfig(model="m", out="o", method=RTNConfig(bits=8), layout="gptq", device="cpu", threads=3)
    again = QuantizeConfig.from_dict(config.to_dict())
    assert again.method == config.method and again.layout == "gptq" and again.threads is None
