import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compactgpt.errors import ConfigError
from compactgpt.pretrain import config_from_preset, pretrain
from compactgpt.training import LoopConfig, lr_at


def tiny_run(data_dir, out, **overrides):
    settings = dict(data=str(data_dir), out=str(out), n_positions=64, block_size=32, batch_size=4,
                    max_steps=8, warmup_steps=2, eval_interval=4, checkpoint_interval=100, log_interval=1,
                    eval_batches=4, dropout=0.1)
    return config_from_preset("tiny", **{**settings, **overrides})


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_loss_goes_down(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "run", max_steps=40, dropout=0.0), log=lambda m: None, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert losses[-1] < losses[0] - 1.0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["metrics"]["val_perplexity"] < manifest["metrics"]["unigram_val_perplexity"]


def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "a"), log=lambda m: None, progress=False)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_run(data_dir, tmp_path / "b"), log=lambda m: None, progress=False, on_step=interrupt)
    assert not (tmp_path / "b" / "model.safetensors").exists()  # no artifact from an interrupted run
    pretrain(tiny_run(data_dir, tmp_path / "b"), log=lambda m: None, progress=False, resume=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resuming_with_another_model_shape_is_refused(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None, progress=False)
    with pytest.raises(ConfigError, match="different settings.*n_layer"):
        pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=4, n_layer=3), log=lambda m: None,
                 progress=False, resume=True)


def test_existing_checkpoint_is_never_overwritten_silently(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None, progress=False)
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None, progress=False)
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None, progress=False, overwrite=True)


def test_learning_rate_schedule():
    cfg = LoopConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        config_from_preset("huge")
    with pytest.raises(ConfigError, match="block_size=512 is longer than n_positions=128"):
        config_from_preset("tiny", block_size=512)
    with pytest.raises(ConfigError, match="bfloat16 on CPU"):
        from compactgpt.training import setup_runtime

        setup_runtime(LoopConfig(dtype="bfloat16", device="cpu"))


@pytest.mark.slow
def test_two_process_torchrun_trains(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "compactgpt", "pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "ddp"),
           "--max-steps", "6", "--n-positions", "64", "--block-size", "32", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    # Two processes: each step saw twice the tokens of one process.
    assert manifest["metrics"]["train_tokens"] == 6 * 2 * 8 * 32
    assert manifest["metrics"]["steps"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compiled_training_runs(data_dir, tmp_path):
    folder = pretrain(tiny_run(data_dir, tmp_path / "gpu", max_steps=20, dropout=0.0, compile=True),
                      log=lambda m: None, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["val_perplexity"] < manifest["metrics"]["unigram_val_perplexity"]
