"""Training robustness: a diverging run stops cleanly, SIGTERM checkpoints, a save cut short is
recovered, a damaged checkpoint is a clear error, and a resumed log repeats no step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compactgpt.app.cli import main
from compactgpt.data import TokenShards
from compactgpt.errors import ArtifactError, ConfigError, StoppedBySignal, TrainingDiverged
from compactgpt.model import GPT
from compactgpt.pretrain import pretrain
from compactgpt.training import LoopConfig, WindowBatches, find_checkpoint, lm_loss, run_loop

from conftest import tiny_config
from test_training import tiny_run, weights  # the same tiny runs as the resume tests

QUIET = dict(log=lambda m: None, progress=False)




def checkpoint_step(out):
    return torch.load(Path(out) / "checkpoint" / "trainer.pt", weights_only=True)["state"]["step"]


def records(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference run every interrupted and resumed run must equal, bit for bit."""
    out = tmp_path_factory.mktemp("guard") / "a"
    pretrain(tiny_run(data_dir, out), log=lambda m: None)
    return out


# ---------------------------------------------------------------------------------------
# Non-finite loss or gradients


def test_huge_learning_rate_stops_with_the_step_and_keeps_a_finite_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: loss .*lower --lr") as info:
        pretrain(tiny_run(data_dir, out, lr=1e9, checkpoint_interval=1), log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (out / "model.safetensors").exists()  # no model folder from a diverged run
    step = int(str(info.value).split("at step ")[1].split(":")[0])
    assert checkpoint_step(out) == step - 1  # the last good step, not the diverged one
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "checkpoint" / "model.safetensors")).values())
    assert all(r["event"] != "train" or r["step"] < step for r in records(out))


def test_non_finite_weights_are_never_checkpointed(data_dir, tmp_path):
    # A step with a finite loss and gradients can still overflow the weights: the checkpoint
    # after it refuses to save them (here a weight is broken by hand after step 2).
    config = LoopConfig(max_steps=4, batch_size=4, warmup_steps=1, eval_interval=100, checkpoint_interval=1,
                        log_interval=1, seed=0, device="cpu")
    model = GPT(tiny_config(vocab_size=320))
    out = tmp_path / "run"
    out.mkdir()

    def overflow(step):
        if step == 2:
            model.transformer.wte.weight.data[0, 0] = float("inf")

    with pytest.raises(TrainingDiverged, match=r"at step 2: the weights are no longer finite.*\(step 1\) is kept"):
        run_loop(model, config, out, WindowBatches(TokenShards(data_dir, "train"), 4, 16), **QUIET, on_step=overflow)
    assert checkpoint_step(out) == 1
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "checkpoint" / "model.safetensors")).values())
    # A learning rate beyond float32 is refused up front (torch would fail on it mid-step).
    with pytest.raises(ConfigError, match="lr=1e\+39 is too large for float32 weights"):
        LoopConfig(lr=1e39)


def test_cli_reports_divergence_in_one_line_with_status_2(data_dir, tmp_path, capsys):
    args = ["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "cli"), "--max-steps", "6",
            "--n-positions", "64", "--block-size", "32", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--lr", "1e9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged at step ") and "lower --lr" in err[-1]
    assert not (tmp_path / "cli" / "model.safetensors").exists()
    # An infinite or NaN learning rate is refused before anything runs: by the flag's parser
    # (argparse exits with status 2) or by LoopConfig's checks.
    try:
        status = main([*args, "--lr", "inf", "--out", str(tmp_path / "inf")])
    except SystemExit as e:
        status = e.code
    assert status == 2 and "inf" in capsys.readouterr().err
    assert not (tmp_path / "inf").exists()
    with pytest.raises(ConfigError, match="lr must be a finite number, got inf"):
        tiny_run(data_dir, tmp_path / "inf", lr=float("inf"))
    for bad in (dict(lr=float("nan")), dict(grad_clip=float("inf")), dict(nan_skips=-1)):
        with pytest.raises(ConfigError):
            LoopConfig(**bad)


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _loop_with_one_bad_step(data_dir, out, bad_step, kind, nan_skips):
    """run_loop on a tiny GPT whose loss (kind "loss") or gradients (kind "grad") are NaN on
    optimizer step bad_step alone; returns the weights after every step."""
    config = LoopConfig(max_steps=5, batch_size=4, warmup_steps=1, eval_interval=100, checkpoint_interval=100,
                        log_interval=1, seed=0, device="cpu", nan_skips=nan_skips)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=320))
    Path(out).mkdir()
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss, n = lm_loss(m, batch)
        if len(calls) == bad_step:
            loss = loss * float("nan") if kind == "loss" else _PoisonGrad.apply(loss)
        return loss, n

    after = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    run_loop(model, config, out, WindowBatches(TokenShards(data_dir, "train"), 4, 16), loss_fn, **QUIET,
             on_step=lambda s: after.update({s: {k: v.clone() for k, v in model.state_dict().items()}}))
    return after


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_skipped_non_finite_step_leaves_the_weights_alone(data_dir, tmp_path, kind):
    after = _loop_with_one_bad_step(data_dir, tmp_path / "skip", 3, kind, nan_skips=1)
    assert sorted(after) == [0, 1, 2, 3, 4, 5]  # trained to the end
    assert all(torch.equal(after[3][k], after[2][k]) for k in after[2])  # step 3 was not applied
    assert not all(torch.equal(after[4][k], after[3][k]) for k in after[3])  # later ones were
    assert all(torch.isfinite(v).all() for v in after[5].values())
    skips = [r for r in records(tmp_path / "skip") if r["event"] == "skip"]
    assert [r["step"] for r in skips] == [3]
    assert 3 not in [r["step"] for r in records(tmp_path / "skip") if r["event"] == "train"]
    # Without a skip budget the same step stops the run.
    with pytest.raises(TrainingDiverged, match="at step 3: loss"):
        _loop_with_one_bad_step(data_dir, tmp_path / "stop", 3, kind, nan_skips=0)


# ---------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "b"
    before = signal.getsignal(signal.SIGTERM)
    messages = []

    def terminate(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StoppedBySignal) as info:
        pretrain(tiny_run(data_dir, out), log=messages.append, on_step=terminate)
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone
    # The signal is noted during step 3; every process agrees on it in step 4, which completes.
    assert "stopped by SIGTERM at step 4; checkpoint saved" in messages[-1] and "--resume" in messages[-1]
    assert checkpoint_step(out) == 4
    assert not (out / "model.safetensors").exists()
    pretrain(tiny_run(data_dir, out, resume=True), log=lambda m: None)
    assert_same_weights(uninterrupted, out)


def test_ctrl_c_waits_for_the_step_boundary_and_twice_stops_at_once(data_dir, tmp_path, uninterrupted):
    """Ctrl-C is noted like SIGTERM, so it never lands between an update and the step count;
    the resumed run equals an uninterrupted one. A second Ctrl-C stops without waiting."""
    out = tmp_path / "c"
    before = signal.getsignal(signal.SIGINT)

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(StoppedBySignal) as info:
        pretrain(tiny_run(data_dir, out), log=lambda m: None, on_step=interrupt)
    assert info.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is before
    assert checkpoint_step(out) == 4
    pretrain(tiny_run(data_dir, out, resume=True), log=lambda m: None)
    assert_same_weights(uninterrupted, out)

    def twice(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as info:
        pretrain(tiny_run(data_dir, tmp_path / "d"), log=lambda m: None, on_step=twice)
    assert not isinstance(info.value, StoppedBySignal)  # not waiting for another step
    assert checkpoint_step(tmp_path / "d") == 2


def _cli(data_dir, out, *flags):
    cmd = [sys.executable, "-m", "compactgpt", "pretrain", "--preset", "tiny", "--data", str(data_dir), "--out",
           str(out), "--n-positions", "64", "--block-size", "32", "--batch-size", "4", "--warmup-steps", "0",
           "--log-interval", "1", "--checkpoint-interval", "1000", "--eval-interval", "1000", "--eval-batches", "2",
           "--no-progress", *map(str, flags)]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cli_sigterm_exits_143_with_a_checkpoint_and_resumes(data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd, env = _cli(data_dir, out, "--max-steps", 5000)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() or '"train"' not in (out / "log.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no training step logged"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    step = checkpoint_step(out)
    assert 1 <= step < 5000
    assert f"stopped by SIGTERM at step {step}; checkpoint saved" in err
    assert max(r["step"] for r in records(out)) == step
    # Resumed, it finishes (bit-identity with an uninterrupted run: the in-process test above).
    subprocess.run(_cli(data_dir, out, "--max-steps", step + 3, "--resume")[0], env=env, check=True,
                   capture_output=True)
    assert (out / "model.safetensors").is_file() and checkpoint_step(out) == step + 3
    assert [r["step"] for r in records(out) if r["event"] == "train"] == list(range(1, step + 4))


# ---------------------------------------------------------------------------------------
# Checkpoints: a save cut short, damaged files


def _interrupted(data_dir, out, at=3):
    def interrupt(step):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_run(data_dir, out), log=lambda m: None, on_step=interrupt)


@pytest.mark.parametrize("left_as", ["checkpoint.old", "checkpoint.tmp"])
def test_a_save_cut_short_between_its_renames_is_resumed(data_dir, tmp_path, uninterrupted, left_as):
    out = tmp_path / "b"
    _interrupted(data_dir, out)
    # save_checkpoint renames checkpoint -> .old, then .tmp -> checkpoint: a crash between the
    # two leaves the last checkpoint as .old (and the new one, complete, as .tmp); the first save
    # of a run leaves only .tmp.
    (out / "checkpoint").rename(out / left_as)
    assert find_checkpoint(out) == out / left_as
    pretrain(tiny_run(data_dir, out, resume=True), log=lambda m: None)
    assert_same_weights(uninterrupted, out)
    assert not (out / left_as).exists()


def test_an_unfinished_tmp_checkpoint_is_never_resumed(data_dir, tmp_path):
    out = tmp_path / "b"
    _interrupted(data_dir, out)
    shutil.copytree(out / "checkpoint", out / "checkpoint.old")
    (out / "checkpoint").rename(out / "checkpoint.tmp")
    (out / "checkpoint.tmp" / "complete").unlink()  # cut short while it was written
    assert find_checkpoint(out) == out / "checkpoint.old"
    (out / "checkpoint.old").rename(tmp_path / "elsewhere")
    assert find_checkpoint(out) is None


def _garbage_pickle(path):
    torch.save({"state": Path("not allowed by weights_only")}, path)


@pytest.mark.parametrize("file, damage", [
    ("trainer.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    ("trainer.pt", _garbage_pickle),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64)),
])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(data_dir, tmp_path, capsys, file, damage):
    out = tmp_path / "b"
    _interrupted(data_dir, out)
    damage(out / "checkpoint" / file)
    with pytest.raises(ArtifactError, match=f"{file} is damaged .*--overwrite") as info:
        pretrain(tiny_run(data_dir, out, resume=True), log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    args = ["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--max-steps", "8",
            "--n-positions", "64", "--block-size", "32", "--batch-size", "4", "--warmup-steps", "2",
            "--eval-interval", "4", "--checkpoint-interval", "100", "--eval-batches", "4", "--dropout", "0.1",
            "--no-progress", "--resume"]
    assert main(args) == 2
    assert f"{file} is damaged" in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------
# The log of a resumed run


def test_a_resumed_log_repeats_no_step(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "b"

    def crash(step):  # killed after step 5 was logged; the last checkpoint is step 4
        if step == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        pretrain(tiny_run(data_dir, out, checkpoint_interval=2), log=lambda m: None, on_step=crash)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "train", "st')  # a line cut short by the kill
    assert checkpoint_step(out) == 4 and '"step": 5,' in (out / "log.jsonl").read_text()
    pretrain(tiny_run(data_dir, out, checkpoint_interval=2, resume=True), log=lambda m: None)
    log = records(out)
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in log if r["event"] == "eval"] == [4, 8]
    ref = records(uninterrupted)
    assert [r["loss"] for r in log if r["event"] == "train"] == [r["loss"] for r in ref if r["event"] == "train"]
