"""onnxruntime-genai runs an export folder (slow: it lives in its own virtual environment,
because it needs the CPU onnxruntime package, which conflicts with onnxruntime-gpu).

Set COMPACTGPT_GENAI_PYTHON to a Python with onnxruntime-genai installed, e.g.
    python -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from compactgpt.artifacts import save_model
from export import ExportConfig, OnnxDecoder, export_onnx
from tests.conftest import random_gpt

GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
folder, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + n, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
while not generator.is_done():
    generator.generate_next_token()
print(json.dumps([int(t) for t in generator.get_sequence(0)]))
"""


def genai_python() -> str | None:
    candidates = [os.environ.get("COMPACTGPT_GENAI_PYTHON"), str(Path(__file__).parents[2] / ".venv-genai/bin/python")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.slow
@pytest.mark.parametrize("ort_format", [False, True])
def test_onnxruntime_genai_generates_what_compactgpt_generates(tmp_path, byte_tokenizer, ort_format):
    python = genai_python()
    if python is None:
        pytest.skip("no Python with onnxruntime-genai (set COMPACTGPT_GENAI_PYTHON)")
    save_model(tmp_path / "m", random_gpt(0), byte_tokenizer, stage="pretrain", settings={})
    out = export_onnx(ExportConfig(model=str(tmp_path / "m"), out=str(tmp_path / "onnx"), ort_format=ort_format),
                      log=lambda m: None)
    if ort_format:
        assert (out / "model.ort").is_file()
        config = json.loads((out / "genai_config.json").read_text())
        config["model"]["decoder"]["filename"] = "model.ort"
        (out / "genai_config.json").write_text(json.dumps(config))
    prompt = [5, 6, 7, 8, 9]
    result = subprocess.run([python, "-c", GENAI_SCRIPT, str(out), json.dumps(prompt), "12"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    genai_tokens = json.loads(result.stdout.strip().splitlines()[-1])
    ours = OnnxDecoder(out, verify=False).generate(  # genai_config.json was edited above
        torch.tensor([prompt]), 12)[0].tolist()
    assert genai_tokens == ours
