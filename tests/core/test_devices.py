"""`--device`: one rule for every verb that runs a PyTorch model (compactgpt.device)."""

from __future__ import annotations

import pytest
import torch

from compactgpt.device import DEVICE_HELP, device_of, resolve_device
from compactgpt.errors import ConfigError

from conftest import random_gpt

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_auto_is_the_gpu_when_one_is_visible_else_the_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")


@no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_config_error_naming_the_flag(spec):
    with pytest.raises(ConfigError, match="--device") as e:
        resolve_device(spec)
    assert "\n" not in str(e.value)


def test_a_device_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match="--device 'nonsense' is not a device") as e:
        resolve_device("nonsense")
    assert DEVICE_HELP in str(e.value) and "\n" not in str(e.value)


def test_device_of_a_module():
    assert device_of(random_gpt(0)) == torch.device("cpu")
    assert device_of(random_gpt(0).to("meta")).type == "meta"
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


def test_an_unsaved_field_stays_out_of_to_dict_but_is_read_back():
    from dataclasses import dataclass

    from compactgpt.config import StageConfig, option

    @dataclass
    class Stage(StageConfig):
        width: int = option(4, "a setting")
        device: str = option("auto", DEVICE_HELP, saved=False)

    assert Stage(device="cpu").to_dict() == {"width": 4} == Stage().to_dict()
    assert Stage.from_dict({"width": 2, "device": "cpu"}).device == "cpu"
