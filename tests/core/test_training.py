import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compactgpt.data import TokenShards
from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.pretrain import config_from_preset, pretrain
from compactgpt.training import LoopConfig, TrainRuntime, WindowBatches, lr_at, run_loop
from conftest import tiny_config


def tiny_run(data_dir, out, **overrides):
    settings = dict(data=str(data_dir), out=str(out), n_positions=64, block_size=32, batch_size=4,
                    max_steps=8, warmup_steps=2, eval_interval=4, checkpoint_interval=100, log_interval=1,
                    eval_batches=4, dropout=0.1, progress=False)
    return config_from_preset("tiny", **{**settings, **overrides})


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_loss_goes_down(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "run", max_steps=40, dropout=0.0), log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert losses[-1] < losses[0] - 1.0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["metrics"]["val_perplexity"] < manifest["metrics"]["unigram_val_perplexity"]


def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "a"), log=lambda m: None)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_run(data_dir, tmp_path / "b"), log=lambda m: None, on_step=interrupt)
    assert not (tmp_path / "b" / "model.safetensors").exists()  # no artifact from an interrupted run
    pretrain(tiny_run(data_dir, tmp_path / "b", resume=True), log=lambda m: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resuming_with_another_model_shape_is_refused(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None)
    with pytest.raises(ConfigError, match="different settings.*n_layer"):
        pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=4, n_layer=3, resume=True), log=lambda m: None)


def test_existing_checkpoint_is_never_overwritten_silently(data_dir, tmp_path):
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2), log=lambda m: None)
    pretrain(tiny_run(data_dir, tmp_path / "r", max_steps=2, overwrite=True), log=lambda m: None)


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


def test_parallel_fsdp_with_one_process_trains_the_plain_model(data_dir, tmp_path):
    # One process has nothing to shard: --parallel fsdp without torchrun is plain training, so a
    # settings file written for several GPUs also runs (and resumes) on one.
    pretrain(tiny_run(data_dir, tmp_path / "a", max_steps=3), log=lambda m: None)
    pretrain(tiny_run(data_dir, tmp_path / "b", max_steps=3, parallel="fsdp"), log=lambda m: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="parallel must be auto, ddp or fsdp"):
        LoopConfig(parallel="zero3")


def _loop(data_dir, out, runtime, on_step=None, resume=False):
    """A few steps of run_loop on a tiny GPT; returns the trained weights and the logged losses."""
    config = LoopConfig(max_steps=4, batch_size=4, warmup_steps=1, eval_interval=2, checkpoint_interval=100,
                        log_interval=1, seed=0, device="cpu")
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=320))
    batches = WindowBatches(TokenShards(data_dir, "train"), batch_size=4, block_size=16)
    Path(out).mkdir(exist_ok=True)
    result = run_loop(model, config, out, batches, runtime=runtime, resume=resume, on_step=on_step,
                      evaluate=lambda m: {"norm": float(sum(p.detach().double().norm() for p in m.parameters()))},
                      log=lambda m: None, progress=False)
    assert result.model is model and model.lm_head.weight is model.transformer.wte.weight
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, records


def _interrupt_at_2(step):
    if step == 2:
        raise KeyboardInterrupt


def test_fsdp_code_path_on_one_process_matches_plain_training(data_dir, tmp_path):
    """The FSDP path (shard a copy, gather for evaluation, checkpoints and the end) on a
    one-process gloo group, in the default suite: it trains as the plain model does, and
    checkpoints cross between the two (the slow test below runs two real processes)."""
    plain = TrainRuntime(torch.device("cpu"), contextlib.nullcontext)
    fsdp = TrainRuntime(torch.device("cpu"), contextlib.nullcontext, fsdp=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ref, ref_log = _loop(data_dir, tmp_path / "plain", plain)
        got, got_log = _loop(data_dir, tmp_path / "fsdp", fsdp)
        runs = {"fsdp": got}
        for first, then in ((fsdp, plain), (plain, fsdp)):  # interrupted one way, resumed the other
            out = tmp_path / f"{first.fsdp}-{then.fsdp}"
            with pytest.raises(KeyboardInterrupt):
                _loop(data_dir, out, first, on_step=_interrupt_at_2)
            runs[out.name] = _loop(data_dir, out, then, resume=True)[0]
    finally:
        torch.distributed.destroy_process_group()
    for key in ("loss", "norm"):  # training losses, and the evaluated model's weights
        assert [r[key] for r in got_log if key in r] == pytest.approx([r[key] for r in ref_log if key in r], rel=1e-5)
    for name, state in runs.items():
        assert state.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def _torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "compactgpt", "pretrain", *map(str, args), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(data_dir, tmp_path):
    """Two FSDP processes x batch 4 train exactly as one process with 2 micro-steps x batch 4:
    every rank draws the same world-sized stream and keeps its share, so rank r's batch is the
    one process's micro-step r. Same losses step by step, same weights, and checkpoints that
    resume across FSDP and DDP."""
    # lr == min_lr: a schedule that does not depend on max_steps, so a run stopped early and
    # resumed with a longer max_steps is the same run.
    settings = dict(n_positions=64, block_size=32, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3,
                    min_lr=3e-3, eval_interval=3, eval_batches=4, checkpoint_interval=3, log_interval=1, dropout=0.0)
    pretrain(tiny_run(data_dir, tmp_path / "one", **settings, grad_accum=2), log=lambda m: None)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]
    flags = ["--preset", "tiny", "--data", data_dir, *flags]
    _torchrun(*flags, "--out", tmp_path / "fsdp", "--parallel", "fsdp")
    one, two = _train_log(tmp_path / "one"), _train_log(tmp_path / "fsdp")
    for event, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        a = [r[key] for r in one if r["event"] == event]
        b = [r[key] for r in two if r["event"] == event]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-4), (key, a, b)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "fsdp")  # the artifact: full weights
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # The checkpoint is the plain format: full weights and a plain optimizer state dict.
    trainer = torch.load(tmp_path / "fsdp" / "checkpoint" / "trainer.pt", weights_only=True)
    plain = torch.load(tmp_path / "one" / "checkpoint" / "trainer.pt", weights_only=True)
    assert trainer["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
    for i, s in plain["optimizer"]["state"].items():
        assert trainer["optimizer"]["state"][i]["exp_avg"].shape == s["exp_avg"].shape
    # Stopped under FSDP at step 2, continued with DDP to 4, finished under FSDP: the same run.
    chain = tmp_path / "chain"
    _torchrun(*flags, "--out", chain, "--parallel", "fsdp", "--max-steps", 2)
    _torchrun(*flags, "--out", chain, "--parallel", "ddp", "--max-steps", 4, "--resume")
    _torchrun(*flags, "--out", chain, "--parallel", "fsdp", "--resume")
    c = weights(chain)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_bf16_mixed_precision_on_cuda(data_dir, tmp_path):
    """FSDP's bf16 MixedPrecisionPolicy (and fused AdamW on DTensor shards) on a one-process
    NCCL group trains like bf16 autocast without sharding, within bf16 rounding."""
    cuda = torch.device("cuda", 0)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, ref_log = _loop(data_dir, tmp_path / "plain", TrainRuntime(cuda, autocast, bf16=True))
        got, got_log = _loop(data_dir, tmp_path / "fsdp", TrainRuntime(cuda, autocast, fsdp=True, bf16=True))
    finally:
        torch.distributed.destroy_process_group()
    losses = [r["loss"] for r in got_log if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in ref_log if "loss" in r], rel=2e-2)
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in got.values())  # fp32 master weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compiled_training_runs(data_dir, tmp_path):
    folder = pretrain(tiny_run(data_dir, tmp_path / "gpu", max_steps=20, dropout=0.0, compile=True),
                      log=lambda m: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["val_perplexity"] < manifest["metrics"]["unigram_val_perplexity"]
