"""Golden codes: a seeded GPTQ run's integer codes, scales and zero points hashed and pinned
(computed by the code before the stage-contract refactor, on the midpoint grid that was then
the only one: `grid="midpoint"` still computes exactly it)."""

from __future__ import annotations

import hashlib

import torch

from quantize import quantize_
from quantize.calibrate import CalibrationData
from quantize.config import GPTQConfig
from quantize.format import gptq_tensors
from quantize.modules import QuantLinear
from tests.conftest import random_gpt

GOLDEN_SHA256 = "356076eb556a3c598a4d050adddd8c9d53ad9a54d5375f561821ba6c056de1ea"


def test_gptq_codes_golden():
    model = random_gpt(4)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, GPTQConfig(bits=4, group_size=16, grid="midpoint"), CalibrationData(ids, "golden"))
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key, tensor in sorted(gptq_tensors(module.qweight).items()):
                digest.update(name.encode())
                digest.update(key.encode())
                digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == GOLDEN_SHA256
