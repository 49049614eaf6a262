"""Golden tokens: greedy decoding of a seeded, briefly trained tiny model through PyTorch and
ONNX Runtime, pinned. The values come from the code before the stage-contract refactor."""

from __future__ import annotations

import pytest
import torch

from compactgpt.artifacts import load_model
from export import ExportConfig, OnnxDecoder, export_onnx
from tests.core.test_training_golden import golden_run

PROMPT = [5, 17, 42, 7, 99]
GOLDEN_TOKENS = [265, 14, 263, 221, 221, 221, 221, 262, 262, 262, 262, 262, 262, 262, 262, 262, 262, 262, 262, 262]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    from compactgpt.pretrain import pretrain

    return pretrain(golden_run(data_dir, tmp_path_factory.mktemp("golden") / "run"), log=lambda m: None)


def test_greedy_tokens_golden_in_pytorch(trained):
    model = load_model(trained).model
    tokens = model.generate(torch.tensor([PROMPT]), len(GOLDEN_TOKENS))
    assert tokens[0].tolist() == PROMPT + GOLDEN_TOKENS


def test_greedy_tokens_golden_in_onnx_runtime(trained, tmp_path):
    folder = export_onnx(ExportConfig(model=str(trained), out=str(tmp_path / "onnx")), log=lambda m: None)
    tokens = OnnxDecoder(folder).generate(torch.tensor([PROMPT]), len(GOLDEN_TOKENS))
    assert tokens[0].tolist() == PROMPT + GOLDEN_TOKENS
