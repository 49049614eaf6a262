"""`compactgpt info REPORT` prints the report's headline; `compactgpt generate` continues one
prompt with several models: repeated --model, or a report folder's baseline and headline (the
end of `make demo`)."""

from __future__ import annotations

import json

import pytest

from compactgpt.app.cli import main
from compactgpt.artifacts import save_model
from conftest import random_gpt

HEADLINE = {"name": "student", "what": "int4 RTN of a student", "x_faster": 2.5, "x_smaller": 9.0,
            "perplexity_delta": 0.075, "tolerance": 0.1}


@pytest.fixture
def report(tmp_path, byte_tokenizer):
    root = tmp_path
    save_model(root / "models" / "teacher", random_gpt(1), byte_tokenizer, stage="test", settings={})
    save_model(root / "models" / "student", random_gpt(2, n_layer=1), byte_tokenizer, stage="test", settings={})
    # Only what info and generate read; folders relative to the report's own, as write_report keeps them.
    rows = [{"name": "teacher", "folder": "../models/teacher"}, {"name": "student", "folder": "../models/student"}]
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text(json.dumps({"baseline": "teacher", "headline": HEADLINE, "rows": rows}))
    return root


def generated(capsys, *argv) -> str:
    assert main(["generate", *map(str, argv), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0.7",
                 "--repetition-penalty", "1.2"]) == 0
    return capsys.readouterr().out


def test_info_prints_a_reports_headline_and_its_models(report, capsys):
    assert main(["info", str(report / "report")]) == 0
    out = capsys.readouterr().out
    assert "Headline: `student` (int4 RTN of a student) is 2.50x faster and 9.00x smaller" in out
    assert out.count("models/teacher") == 1 and out.count("models/student") == 1


def test_generate_continues_one_prompt_with_each_model_of_a_report(report, capsys):
    one = {name: generated(capsys, "--model", report / "models" / name) for name in ("teacher", "student")}
    both = generated(capsys, "--model", report / "report")
    given = generated(capsys, "--model", report / "models" / "teacher", "--model", report / "models" / "student")
    assert both == given.replace(str(report / "models"), str((report / "models").resolve()))
    teacher_part, student_part = both.split("\n\n== student")
    assert teacher_part.startswith("== teacher (") and teacher_part.endswith(one["teacher"].rstrip("\n"))
    assert student_part.endswith(one["student"]) and one["teacher"] != one["student"]
