"""The command line end to end on a tiny corpus: tokenize, pretrain, resume, eval, generate, info."""

import json

import pytest

from compactgpt.app.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("cli")
    assert main(["tokenize", "--data", str(corpus_dir), "--out", str(root / "data"), "--vocab-size", "300"]) == 0
    assert main(["pretrain", "--preset", "tiny", "--data", str(root / "data"), "--out", str(root / "teacher"),
                 "--max-steps", "30", "--n-positions", "64", "--block-size", "32", "--no-progress"]) == 0
    return root


def test_eval_json_reports_perplexity_of_the_validation_split(trained, capsys):
    code, out, _ = run(capsys, "eval", "--model", trained / "teacher", "--json", "--max-length", "32", "--stride", "16")
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] > 100 and 1 < result["perplexity"] < 300
    assert "val split" in result["data"]


def test_eval_on_a_text_file(trained, capsys, tmp_path):
    text = tmp_path / "t.py"
    text.write_text("def value_1(self, name):\n    return name\n" * 10)
    code, out, _ = run(capsys, "eval", "--model", trained / "teacher", "--data", text, "--json")
    assert code == 0 and json.loads(out)["windows"] >= 1


def test_generate_streams_text(trained, capsys):
    code, out, _ = run(capsys, "generate", "--model", trained / "teacher", "--prompt", "def ", "--max-new-tokens", "20",
                       "--temperature", "0")
    assert code == 0 and out.startswith("def ") and len(out) > 5


def test_info_prints_the_manifest(trained, capsys):
    code, out, _ = run(capsys, "info", trained / "teacher", "--json")
    manifest = json.loads(out)
    assert manifest["stage"] == "pretrain" and manifest["settings"]["max_steps"] == 30
    assert manifest["parent"]["path"].endswith("data")


def test_resume_from_files_alone_extends_a_run(trained, capsys, tmp_path):
    import shutil

    run_dir = tmp_path / "teacher"
    shutil.copytree(trained / "teacher", run_dir)
    code, _, err = run(capsys, "pretrain", "--out", run_dir, "--resume", "--max-steps", "35", "--no-progress")
    assert code == 0, err
    assert "resumed" in err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 35 and manifest["settings"]["n_positions"] == 64


def test_errors_are_one_line_with_a_fix(trained, capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", tmp_path)
    assert code == 2 and err.startswith("error: ") and "config.json" in err
    code, _, err = run(capsys, "pretrain", "--preset", "tiny", "--data", trained / "data", "--out", trained / "teacher",
                       "--no-progress")
    assert code == 2 and "--resume" in err
    code, _, err = run(capsys, "pretrain", "--data", tmp_path / "nothing", "--out", tmp_path / "x", "--preset", "tiny")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "generate", "--model", trained / "teacher", "--prompt", "x " * 70, "--max-new-tokens", "10")
    assert code == 2 and "positions" in err
    code, _, err = run(capsys, "eval", "--model", trained / "teacher", "--max-length", "500")
    assert code == 2 and "longer than the model's 64 positions" in err


def test_eval_scores_an_onnx_export_like_its_pytorch_model(trained, capsys):
    onnx_dir = trained / "teacher-onnx"
    if not (onnx_dir / "manifest.json").exists():
        assert main(["export", "--model", str(trained / "teacher"), "--out", str(onnx_dir)]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "eval", "--model", trained / "teacher", "--json", "--max-length", "32", "--stride", "16")
    assert code == 0, err
    torch_result = json.loads(out)
    code, out, err = run(capsys, "eval", "--model", onnx_dir, "--json", "--max-length", "32", "--stride", "16")
    assert code == 0, err
    onnx_result = json.loads(out)
    assert onnx_result["tokens"] == torch_result["tokens"]  # the held-out split found through the parents
    assert onnx_result["perplexity"] == pytest.approx(torch_result["perplexity"], rel=1e-4)


def test_a_closed_pipe_ends_quietly(trained):
    """`compactgpt info X | head -1`: no traceback when the reader stops early."""
    import subprocess
    import sys

    reader = subprocess.Popen([sys.executable, "-m", "compactgpt", "info", str(trained / "teacher")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.close()  # the reader is gone before the first line is written
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=60) in (0, 141) and "Traceback" not in stderr, stderr
