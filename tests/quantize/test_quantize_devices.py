"""Quantization runs where the model is: calibration windows are drawn on the CPU and moved to
the model's device by the walk, and the `gpu` tests quantize on CUDA into the same artifact
format as on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from compactgpt.artifacts import save_model
from quantize.calibrate import BlockHooks, CalibrationData, embed, walk_blocks

from conftest import random_gpt
from device_helpers import input_devices, off_device

warnings.filterwarnings("ignore")


class DeviceRecorder(BlockHooks):
    """Notes the device of every layer input the walk hands to a method."""

    def __init__(self):
        self.devices: set[str] = set()

    def observe(self, layer, x):
        self.devices.add(x.device.type)


def test_embed_moves_cpu_windows_to_the_model_device():
    model = random_gpt(0).to("meta")
    seen, _ = input_devices(model)
    xs = embed(model, torch.randint(0, 320, (3, 8)))  # calibration_windows draws them on the CPU
    assert xs.device.type == "meta" and tuple(xs.shape) == (3, 8, 32)
    assert seen and not off_device(seen)


def test_calibration_walk_runs_on_the_model_device_with_cpu_windows():
    model = random_gpt(0, n_layer=2).to("meta")
    seen, _ = input_devices(model)
    hooks = DeviceRecorder()
    out = walk_blocks(model, CalibrationData(torch.randint(0, 320, (20, 8)), "cpu windows"), hooks)
    assert out.device.type == "meta" and tuple(out.shape) == (20, 8, 32)
    assert hooks.devices == {"meta"}
    assert seen and not off_device(seen), off_device(seen)[:3]


# ---------------------------------------------------------------------------------------
# On a GPU (pytest -m gpu)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def float_model_dir(tmp_path, data_dir, tokenizer):
    folder = tmp_path / "model"
    save_model(folder, random_gpt(0, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={},
               parent=data_dir)
    return folder


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method, extra", [("gptq", ["--group-size", "16", "--calib-samples", "8",
                                                     "--calib-seq-len", "16"]),
                                           ("bnb-nf4", [])])
def test_quantize_on_cuda_writes_the_cpu_format(float_model_dir, tmp_path, method, extra):
    from compactgpt.app.cli import main
    from quantize import load_quantized

    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"q-{device}"
        assert main(["quantize", "--model", str(float_model_dir), "--out", str(outs[device]), "--method", method,
                     "--device", device, "--no-progress", *extra]) == 0
    cpu, cuda = _tensors(outs["cpu"]), _tensors(outs["cuda"])
    # The same tensors, dtypes and shapes, all saved from the CPU: the format does not depend
    # on where the quantization ran (the values may differ in the last rounding).
    assert sorted(cpu) == sorted(cuda)
    for k in cpu:
        assert (cpu[k].dtype, cpu[k].shape, cuda[k].device.type) == (cuda[k].dtype, cuda[k].shape, "cpu"), k
    art = load_quantized(outs["cuda"], device="cuda")
    ids = torch.randint(0, 300, (1, 16))
    assert art.model(ids.cuda()).logits.device.type == "cuda"
    want = load_quantized(outs["cuda"]).model(ids).logits
    assert torch.allclose(art.model(ids.cuda()).logits.cpu(), want, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_gpu
def test_gptq_solve_on_cuda_matches_the_cpu_solve():
    from quantize.gptq import accumulate_hessian, gptq_quantize

    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(256, 64)
    H = accumulate_hessian(None, x)
    on_cpu = gptq_quantize(w, H, 4, 16)
    on_gpu = gptq_quantize(w.cuda(), H.cuda(), 4, 16)
    assert on_gpu.codes.device.type == "cuda"
    # float64 solves on both: codes may differ only where a weight sits on a rounding boundary.
    assert (on_gpu.codes.cpu() != on_cpu.codes).float().mean() < 0.01
    assert torch.allclose(on_gpu.scales.cpu(), on_cpu.scales)


def test_moving_a_quantized_model_keeps_the_tied_embedding_one_weight(tmp_path, byte_tokenizer):
    from quantize import RTNConfig, load_quantized, quantize_, save_quantized

    model = random_gpt(0)
    config = RTNConfig(bits=4, group_size=16, include_embeddings=True)
    quantize_(model, config)
    model.to("cpu")  # a move to where the weights already are changes nothing
    assert model.transformer.wte.qweight is model.lm_head.qweight
    save_quantized(tmp_path / "q", model, byte_tokenizer, config)
    loaded = load_quantized(tmp_path / "q", device="cpu").model
    assert loaded.transformer.wte.qweight is loaded.lm_head.qweight
