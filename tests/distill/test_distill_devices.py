"""Pruning and sparsity calibrate where the model is: calibration batches are drawn on the
CPU and moved to the model's device; the `gpu` test prunes on CUDA."""

from __future__ import annotations

import pytest
import torch

from distill.importance import collect_stats, forward_skipping

from conftest import random_gpt
from device_helpers import input_devices, off_device


def test_importance_calibration_moves_cpu_batches_to_the_model_device():
    model = random_gpt(0).to("meta")
    seen, _ = input_devices(model)
    batches = list(torch.randint(0, 320, (6, 8)).split(4))  # calibration_windows draws them on the CPU
    stats = collect_stats(model, batches, linear_inputs=True)
    assert stats.tokens == 48
    assert stats.heads[0].device.type == "meta" and stats.neurons[1].device.type == "meta"
    assert stats.channels.device.type == "meta" and stats.influence[0].device.type == "meta"
    assert {t.device.type for t in stats.inputs.values()} == {"meta"}
    assert seen and not off_device(seen), off_device(seen)[:3]


def test_block_skipping_runs_on_the_model_device():
    model = random_gpt(0, n_layer=3).to("meta")
    seen, _ = input_devices(model)
    logits = forward_skipping(model, torch.randint(0, 320, (2, 8)), {1})
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, 8, 320)
    assert seen and not off_device(seen), off_device(seen)[:3]


def test_importance_scores_are_the_same_as_before_on_the_cpu():
    # Block influence is now summed as a float64 tensor (no host sync per block): the scores
    # must equal a float64 Python sum of the same per-batch values.
    from distill.importance import cosine_influence_sum

    model = random_gpt(1, n_layer=3)
    batches = list(torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0)).split(3))
    stats = collect_stats(model, batches)
    want = [0.0] * 3
    with torch.no_grad():
        for ids in batches:
            x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(16)[None])
            for i, block in enumerate(model.transformer.h):
                y = block(x)[0]
                want[i] += float(cosine_influence_sum(x, y))
                x = y
    assert stats.cosine_scores().tolist() == torch.tensor([w / stats.tokens for w in want]).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prune_and_sparsify_on_cuda(tmp_path, data_dir, tokenizer):
    from compactgpt.app.cli import main
    from compactgpt.artifacts import load_model, read_manifest, save_model

    teacher = tmp_path / "teacher"
    save_model(teacher, random_gpt(4, n_layer=3), tokenizer, stage="pretrain", settings={"data": str(data_dir)},
               parent=data_dir)
    common = ["--calib-samples", "8", "--calib-seq-len", "32", "--eval-tokens", "400", "--no-progress"]
    for device in ("cpu", "cuda"):
        assert main(["prune", "--model", str(teacher), "--out", str(tmp_path / f"p-{device}"), "--layers", "2",
                     "--heads", "2", "--device", device, *common]) == 0
        assert main(["sparsify", "--model", str(teacher), "--out", str(tmp_path / f"s-{device}"),
                     "--device", device, *common]) == 0
    cpu, cuda = read_manifest(tmp_path / "p-cpu"), read_manifest(tmp_path / "p-cuda")
    # Where it ran is no setting: the two manifests differ only in the folder they name.
    assert {**cuda.settings, "out": ""} == {**cpu.settings, "out": ""} and "device" not in cuda.settings
    assert cuda.metrics["val_perplexity"] == pytest.approx(cpu.metrics["val_perplexity"], rel=1e-3)
    assert load_model(tmp_path / "p-cuda").model.config.n_layer == 2
    s_cpu, s_cuda = read_manifest(tmp_path / "s-cpu"), read_manifest(tmp_path / "s-cuda")
    assert s_cuda.metrics["sparsity"] == s_cpu.metrics["sparsity"]
