"""A write that fails (full disk, quota, read-only disk, permissions) ends every verb with one
line naming the file, what was kept and the fix, exit status 2, no traceback; nothing written
before is lost, and the same command (with --resume for training) finishes once there is room.
Read errors are not write faults."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from compactgpt.app.cli import main
from compactgpt.artifacts import INCOMPLETE, MANIFEST, load_model, save_model
from compactgpt.errors import WriteError, write_fault
from compactgpt.io import atomic_write_json
from compactgpt.outputs import LOCK, claim_output
from tests.conftest import random_gpt

ROOT = Path(__file__).resolve().parents[2]
FULL = "No space left on device"
SAFETENSORS_FULL = f"Error while serializing: I/O error: {FULL} (os error 28)"
TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
              "file write failed")


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The error line a verb ended with (its progress lines come before it on stderr)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [l for l in lines if l.startswith("error:")] == lines[-1:], err
    assert lines[-1].startswith("error: could not write "), err
    return lines[-1]


def disk_full(filename=None):
    """A writer that fails as a full disk makes it fail."""
    def write(*args, **kwargs):
        raise OSError(errno.ENOSPC, FULL, *([str(filename)] if filename is not None else []))
    return write


@pytest.fixture
def model_dir(tmp_path, tokenizer, data_dir) -> Path:
    folder = tmp_path / "teacher"
    save_model(folder, random_gpt(), tokenizer, stage="pretrain", settings={}, parent=data_dir)
    return folder


# ---------------------------------------------------------------------------------------
# What counts as a write fault


@pytest.mark.parametrize("exc, found", [
    (OSError(errno.ENOSPC, FULL, "/runs/out/model.safetensors"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EROFS, "Read-only file system", "/elsewhere/x"), errno.EROFS),
    (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/out/config.json"), errno.EACCES),
    (SafetensorError(SAFETENSORS_FULL), errno.ENOSPC),
    (SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) at path "/x/.tmp1"'),
     errno.EACCES),
    (RuntimeError(TORCH_FULL), None),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None),
])
def test_write_faults_are_recognized_through_the_libraries(exc, found):
    fault = write_fault(exc, "/runs/out")
    assert fault is not None and fault.errno == found


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/out/missing.json"),
    PermissionError(errno.EACCES, "Permission denied", "/data/input.txt"),  # an input this user may not read
    PermissionError(errno.EACCES, "Permission denied"),  # no file named: nothing says it was a write
    SafetensorError("Error while deserializing header: HeaderTooLarge"),
    RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"),
    RuntimeError("[enforce fail at inline_container.cc:400] . file not found: archive/data.pkl"),
    ValueError("not a write"),
])
def test_read_errors_are_not_write_faults(exc):
    assert write_fault(exc, "/runs/out") is None


def test_a_claim_turns_a_write_fault_into_one_write_error_and_releases(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WriteError) as caught:
        with claim_output(out, stage="quantize"):
            atomic_write_json(out / INCOMPLETE, {"stage": "quantize"})
            raise OSError(errno.ENOSPC, FULL, str(out / "model.safetensors"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"could not write {out / 'model.safetensors'}: {FULL}")
    assert "stays marked incomplete" in message and "free space" in message and "rerun the same command" in message
    assert "--resume" not in message
    assert not (out / LOCK).exists()
    with claim_output(out, stage="quantize"):  # the same stage takes the unfinished folder again
        pass


def test_read_errors_pass_through_a_claim_unchanged(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        with claim_output(out, stage="quantize"):
            (tmp_path / "missing.json").read_text()
    assert not out.exists()  # the claim made it, nothing was written: removed again


def test_atomic_writes_name_their_file_not_the_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    from compactgpt.artifacts import write_weights

    monkeypatch.setattr(safetensors.torch, "serialize_file", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError(SAFETENSORS_FULL)))
    with pytest.raises(OSError) as caught:
        write_weights(tmp_path / "model.safetensors", random_gpt())
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


# ---------------------------------------------------------------------------------------
# The verbs, on a full disk


def test_quantize_on_a_full_disk(model_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL)

    out = tmp_path / "q"
    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", out, "--method", "rtn", "--no-progress")
    assert code == 2
    line = one_line(err)
    assert f"{out / 'model.safetensors'}: {FULL}" in line and "stays marked incomplete" in line
    assert "free space on that disk, then rerun the same command" in line
    assert (out / INCOMPLETE).exists() and not (out / MANIFEST).exists() and not (out / LOCK).exists()
    monkeypatch.undo()
    code, err = run(capsys, "quantize", "--model", model_dir, "--out", out, "--method", "rtn", "--no-progress")
    assert code == 0, err
    assert not (out / INCOMPLETE).exists() and (out / MANIFEST).exists()


def test_export_on_a_full_disk(model_dir, tmp_path, monkeypatch, capsys):
    import onnx

    out = tmp_path / "onnx"
    monkeypatch.setattr(onnx, "save_model", disk_full())  # as open().write() fails: no file named
    code, err = run(capsys, "export", "--model", model_dir, "--out", out, "--no-optimize")
    assert code == 2
    line = one_line(err)
    assert f"could not write into {out}: {FULL}" in line and "stays marked incomplete" in line
    assert "free space" in line and "rerun the same command" in line
    assert (out / INCOMPLETE).exists() and not (out / LOCK).exists()
    load_model(model_dir)  # the input is untouched


def test_pretrain_on_a_full_disk_keeps_its_checkpoint_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "teacher"
    args = ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--max-steps", "4",
            "--checkpoint-interval", "2", "--n-positions", "64", "--block-size", "32", "--no-progress"]
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *a, **k):  # the first checkpoint is written, the disk is full at the second
        calls.append(f)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, FULL, str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill)
    code, err = run(capsys, *args)
    assert code == 2 and len(calls) == 2
    line = one_line(err)
    assert f"{calls[1]}: {FULL}" in line and f"its last checkpoint ({out / 'checkpoint'}) is kept" in line
    assert line.endswith("free space on that disk, then rerun the same command with --resume")
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["state"]["step"] == 2  # the checkpoint from before the fault still loads
    assert not (out / MANIFEST).exists() and not (out / LOCK).exists()

    monkeypatch.undo()
    code, err = run(capsys, *args, "--resume")
    assert code == 0, err
    assert "resumed" in err
    assert json.loads((out / MANIFEST).read_text())["metrics"]["steps"] == 4
    load_model(out)


def test_pretrain_fault_in_the_final_save_is_finished_by_resume(data_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "teacher"
    args = ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--max-steps", "2",
            "--n-positions", "64", "--block-size", "32", "--no-progress"]
    real = safetensors.torch.serialize_file

    def fill_at_the_model(tensors, filename, *a, **k):  # checkpoints fit; the artifact's weights do not
        if "checkpoint" not in str(filename):
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "serialize_file", fill_at_the_model)
    code, err = run(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert f"{out / 'model.safetensors'}: {FULL}" in line and "stays marked incomplete" in line
    assert "its last checkpoint" in line and line.endswith("with --resume")
    monkeypatch.undo()
    code, err = run(capsys, *args, "--resume")
    assert code == 0, err
    load_model(out)


def test_a_fault_outside_any_claim_is_one_line_too(tmp_path, monkeypatch, capsys):
    # The pipeline writes its own records beside the stage folders; a full disk there reads the
    # same, without --resume (the pipeline resumes by itself).
    import compactgpt.app.pipeline.run as pipeline_run

    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"corpus": {}, "teacher": {}, "bench": {}}))
    monkeypatch.setattr(pipeline_run, "plan", disk_full(tmp_path / "p" / "pipeline-run.json"))
    code, err = run(capsys, "pipeline", "--config", path, "--out", tmp_path / "p")
    assert code == 2
    line = one_line(err)
    assert str(tmp_path / "p" / "pipeline-run.json") in line and "every finished artifact is kept" in line


def test_the_pipeline_is_rerun_without_resume(tmp_path, monkeypatch, capsys):
    # A training stage's fault inside the pipeline: the pipeline has no --resume, and needs none.
    import compactgpt.app.pipeline.run as pipeline_run

    def fault(*args, **kwargs):
        raise WriteError(str(tmp_path / "teacher" / "model.safetensors"), FULL, "its last checkpoint is kept",
                         "free space on that disk", resume=True)

    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"corpus": {}, "teacher": {}, "bench": {}}))
    monkeypatch.setattr(pipeline_run, "plan", fault)
    code, err = run(capsys, "pipeline", "--config", path, "--out", tmp_path / "p")
    assert code == 2
    assert one_line(err).endswith("free space on that disk, then rerun the same command")


def test_other_errors_keep_their_traceback(monkeypatch):
    import compactgpt.app.commands.core as core

    monkeypatch.setattr(core, "run_info", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "x"])


def verb_args(verb: str, m: Path, out: Path, corpus_dir: Path, data_dir: Path) -> list:
    """Each verb writing `out` from the tiny model `m`, as quickly as it runs."""
    steps = ["--max-steps", "2", "--no-progress"]
    calibration = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "200", "--no-progress"]
    return {
        "tokenize": ["tokenize", "--data", corpus_dir, "--out", out, "--vocab-size", "300"],
        "pretrain": ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--n-positions", "64",
                     "--block-size", "32", *steps],
        "finetune": ["finetune", "--model", m, "--task", "lm", "--data", corpus_dir, "--out", out, *steps],
        "prune": ["prune", "--model", m, "--out", out, "--layers", "1", *calibration],
        "sparsify": ["sparsify", "--model", m, "--out", out, *calibration],
        "distill": ["distill", "--teacher", m, "--student", "n_layer=1,n_embd=32,n_head=4", "--out", out,
                    "--data", data_dir, *steps],
        "quantize": ["quantize", "--model", m, "--out", out, "--method", "rtn", "--no-progress"],
        "export": ["export", "--model", m, "--out", out, "--no-optimize"],
        "bench": ["bench", "--models", m, "--data", data_dir, "--out", out, "--eval-tokens", "200",
                  "--prompt-tokens", "4", "--new-tokens", "3", "--batch-sizes", "1", "--warmup", "0",
                  "--repeats", "1", "--threads", "1", "--no-memory", "--no-progress"],
    }[verb]


@pytest.mark.parametrize("verb", ["tokenize", "pretrain", "finetune", "prune", "sparsify", "distill", "quantize",
                                  "export", "bench"])
def test_every_verb_writes_inside_its_claim(verb, model_dir, corpus_dir, data_dir, tmp_path, monkeypatch, capsys):
    # fsync reports a full disk (as it does where space is allocated late: NFS, thin volumes).
    # Every artifact file goes through atomic_write, which fsyncs: every verb meets the fault.
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", disk_full())
    code, err = run(capsys, *verb_args(verb, model_dir, out, corpus_dir, data_dir))
    assert code == 2
    line = one_line(err)
    assert f"could not write {out}" in line and FULL in line and "free space on that disk" in line, line
    assert not (out / LOCK).exists() and not (out / MANIFEST).exists()
    load_model(model_dir)


# ---------------------------------------------------------------------------------------
# A real limit: the kernel refuses the write (ulimit -f), no writer patched


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("verb", ["quantize", "pretrain"])
def test_a_real_write_limit_is_one_line(verb, model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    weights = (model_dir / "model.safetensors").stat().st_size
    args = {
        "quantize": ["quantize", "--model", model_dir, "--out", out, "--method", "rtn", "--bits", "8"],
        "pretrain": ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--max-steps", "2",
                     "--n-positions", "64", "--block-size", "32"],
    }[verb]
    # Small files (markers, JSON, the tokenizer) fit; weights and checkpoints do not.
    limit = weights // 3
    proc = subprocess.run([sys.executable, "-m", "compactgpt", *map(str, args), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=_file_size_limit(limit), timeout=600)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "File too large" in line or "the write failed" in line
    assert "ulimit -f" in line or "free space" in line
    assert not (out / LOCK).exists()
    if verb == "pretrain":
        assert "no checkpoint had been saved yet" in line and "--resume" not in line


def test_torch_and_safetensors_real_write_failures_are_recognized(tmp_path):
    # Their real messages, not imitations: each writer hits the file size limit in a child process.
    code = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from compactgpt.errors import write_fault\n"
        "for write in (lambda: torch.save(torch.zeros(100_000), sys.argv[1] + '/t.pt'),\n"
        "              lambda: save_file({'w': torch.zeros(100_000)}, sys.argv[1] + '/w.safetensors')):\n"
        "    try:\n"
        "        write()\n"
        "    except Exception as e:\n"
        "        fault = write_fault(e, sys.argv[1])\n"
        "        print(type(e).__name__, fault.errno if fault is not None else 'missed', fault and fault.strerror)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(50_000), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("RuntimeError None the write failed (torch's file writer"), lines
    assert lines[1] == f"SafetensorError {errno.EFBIG} File too large", lines
