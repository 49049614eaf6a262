"""Nothing lost: every verb refuses an --out that would destroy an input or another artifact,
two runs never write one folder at once, and a finished folder holds no temporary files and
files any user may read (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compactgpt import outputs, training
from compactgpt.app.cli import main
from compactgpt.artifacts import INCOMPLETE, MANIFEST, load_model, save_model
from compactgpt.errors import ConfigError
from compactgpt.outputs import LOCK, claim_output
from tests.conftest import random_gpt

ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path: a folder left byte-identical compares equal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path, tokenizer, data_dir) -> Path:
    """A tiny finished model whose parent is the shared data folder (its calibration data)."""
    folder = tmp_path / "runs" / "teacher"
    save_model(folder, random_gpt(), tokenizer, stage="pretrain", settings={}, parent=data_dir)
    return folder


def refuses_into_itself(model_dir: Path, corpus_dir: Path, data_dir: Path) -> dict[str, list]:
    """Each verb's arguments that write over its own input model."""
    m = model_dir
    return {
        "quantize": ["quantize", "--model", m, "--out", m, "--method", "rtn"],
        "prune": ["prune", "--model", m, "--out", m, "--layers", "1"],
        "sparsify": ["sparsify", "--model", m, "--out", m],
        "distill": ["distill", "--teacher", m, "--student", "n_layer=1,n_embd=32,n_head=4", "--out", m,
                    "--data", data_dir],
        "export": ["export", "--model", m, "--out", m],
        "tokenize": ["tokenize", "--data", corpus_dir, "--tokenizer", m, "--out", m, "--overwrite"],
        "pretrain": ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", m],
        "finetune": ["finetune", "--model", m, "--task", "lm", "--data", corpus_dir, "--out", m, "--overwrite"],
        "bench": ["bench", "--models", m, "--data", data_dir, "--out", m, "--overwrite"],
    }


@pytest.mark.parametrize("verb", ["quantize", "prune", "sparsify", "distill", "export", "tokenize", "pretrain",
                                  "finetune", "bench"])
def test_no_verb_writes_over_its_input(verb, model_dir, corpus_dir, data_dir, capsys):
    before = snapshot(model_dir)
    code, err = run(capsys, *refuses_into_itself(model_dir, corpus_dir, data_dir)[verb])
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("must differ from" in err) or ("already holds a finished pretrain artifact" in err), err
    assert snapshot(model_dir) == before  # byte-identical, no lock or marker left behind
    load_model(model_dir)


def test_an_out_above_an_input_is_refused_even_with_overwrite(model_dir, capsys):
    before = snapshot(model_dir.parent)
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", model_dir.parent, "--method", "rtn",
                    "--overwrite")
    assert code == 2 and f"contains --model {model_dir}" in err and "outside it" in err
    assert snapshot(model_dir.parent) == before


def test_another_artifact_needs_overwrite_and_is_then_replaced_whole(model_dir, tmp_path, tokenizer, capsys):
    other = tmp_path / "other"
    save_model(other, random_gpt(seed=1), tokenizer, stage="pretrain", settings={},
               extra_files={"notes.txt": lambda p: p.write_text("old")})
    before = snapshot(other)
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", other, "--method", "rtn", "--no-progress")
    assert code == 2 and "already holds a finished pretrain artifact" in err and "--overwrite" in err
    assert snapshot(other) == before
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", other, "--method", "rtn", "--no-progress",
                    "--overwrite")
    assert code == 0, err
    manifest = json.loads((other / MANIFEST).read_text())
    assert manifest["stage"] == "quantize"
    # No file of the replaced artifact survives into the new one; no lock either.
    assert not (other / "notes.txt").exists() and not (other / LOCK).exists()
    assert sorted(p.name for p in other.iterdir()) == sorted([MANIFEST, *manifest["files"]])


@pytest.mark.parametrize("verb", ["tokenize", "pretrain", "quantize", "export", "distill", "prune", "bench"])
def test_an_existing_file_as_out_is_a_one_line_error(verb, model_dir, corpus_dir, data_dir, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    args = {
        "tokenize": ["tokenize", "--data", corpus_dir, "--out", target],
        "pretrain": ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", target],
        "quantize": ["quantize", "--model", model_dir, "--out", target, "--method", "rtn"],
        "export": ["export", "--model", model_dir, "--out", target],
        "distill": ["distill", "--teacher", model_dir, "--student", "n_layer=1,n_embd=32,n_head=4", "--out", target],
        "prune": ["prune", "--model", model_dir, "--out", target, "--layers", "1"],
        "bench": ["bench", "--models", model_dir, "--data", data_dir, "--out", target],
    }[verb]
    code, err = run(capsys, *args)
    assert code == 2 and "is an existing file, not a folder" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_an_out_under_a_file_is_a_one_line_error(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = run(capsys, "export", "--model", model_dir, "--out", tmp_path / "file" / "onnx")
    assert code == 2 and "is a file, not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder_is_a_one_line_error(model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = run(capsys, "quantize", "--model", model_dir, "--out", ro / "q", "--method", "rtn")
    finally:
        ro.chmod(0o755)
    assert code == 2 and "cannot write" in err


def test_a_folder_that_cannot_be_created_is_a_one_line_error(model_dir, capsys):
    # /proc refuses new entries even to root, whose permissions checks always pass.
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", "/proc/compactgpt-no-such/q",
                    "--method", "rtn")
    assert code == 2 and "--out /proc/compactgpt-no-such/q" in err and "Traceback" not in err


def test_a_lock_held_by_a_live_run_names_its_holder(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    with claim_output(out, stage="quantize", inputs={}, overwrite=False):
        code, err = run(capsys, "quantize", "--model", model_dir, "--out", out, "--method", "rtn")
        assert code == 2, err
        assert f"is being written by quantize (pid {os.getpid()} on" in err and "since" in err
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["stage"] == "quantize"
    assert not out.exists()  # the claim made the folder and nothing was written: removed again


def test_a_stale_lock_of_a_dead_process_is_taken_over(corpus_dir, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "stage": "data",
                                        "since": "2020-01-01T00:00:00+00:00"}))
    code, err = run(capsys, "tokenize", "--data", corpus_dir, "--out", out, "--vocab-size", "300")
    assert code == 0, err
    assert not (out / LOCK).exists() and LOCK not in json.loads((out / MANIFEST).read_text())["files"]


def test_the_lock_is_released_when_the_stage_fails(tmp_path, model_dir):
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with claim_output(out, stage="quantize", inputs={"--model": model_dir}, overwrite=False):
            raise RuntimeError("the stage failed")
    assert not (out / LOCK).exists()
    claim_output(out, stage="quantize").release()  # free again


def _lock_holder(path: Path) -> int | None:
    try:
        return json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_two_runs_into_one_folder_one_wins_the_other_is_told(data_dir, tmp_path):
    out = tmp_path / "teacher"
    cmd = [sys.executable, "-m", "compactgpt", "pretrain", "--preset", "tiny", "--data", str(data_dir), "--out",
           str(out), "--n-positions", "64", "--block-size", "32", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd + ["--max-steps", "10"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # The holder's JSON is written once it holds the lock; it is then frozen (SIGSTOP) so that
        # the second run certainly meets it at work, however slow this machine is.
        while _lock_holder(out / LOCK) != first.pid and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd + ["--max-steps", "5"], cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "is being written by pretrain (pid" in second.stderr, second.stderr
    assert json.loads((out / MANIFEST).read_text())["settings"]["max_steps"] == 10
    assert not (out / LOCK).exists()


def test_a_stray_temporary_file_does_not_survive_a_finished_write(tmp_path, tokenizer):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / INCOMPLETE).write_text("interrupted")
    (folder / ".config.json.k1ll3d.tmp").write_text("{half")
    save_model(folder, random_gpt(), tokenizer, stage="pretrain", settings={})
    assert not list(folder.glob(".*.tmp")) and not (folder / INCOMPLETE).exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_files_follow_the_umask(tmp_path, tokenizer, umask):
    old = os.umask(umask)
    try:
        folder = tmp_path / "m"
        save_model(folder, random_gpt(), tokenizer, stage="pretrain", settings={})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_unfinished_write_of_the_same_stage_is_taken_up_another_stage_needs_overwrite(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / INCOMPLETE).write_text(json.dumps({"stage": "quantize", "previous_files": []}))
    claim_output(out, stage="quantize").release()
    with pytest.raises(ConfigError, match="holds an unfinished quantize write; pass --overwrite"):
        claim_output(out, stage="export")
    claim_output(out, stage="export", overwrite=True).release()


def test_finished_model_without_checkpoint_is_not_silently_retrained_by_resume(model_dir):
    with pytest.raises(ConfigError, match="already holds a finished pretrain artifact"):
        claim_output(model_dir, stage="pretrain", resume=True, trains=True)


def test_the_checkpoint_folder_name_is_the_training_loops():
    assert outputs.CHECKPOINT == training.CHECKPOINT
