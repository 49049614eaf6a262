"""Distillation between models whose embeddings pad the vocabulary: the frozen teacher runs
in eval mode, where its padding logits are masked to the lowest float, so the divergences
must compare the real tokens only (else reverse KL is astronomically large and a temperature
below 1 turns the mask into -inf and the loss into NaN)."""

import math

import pytest
import torch

from compactgpt.artifacts import load_model, read_manifest, save_model
from distill.distill import DistillConfig, distill

from conftest import random_gpt

FAST = dict(block_size=32, batch_size=4, max_steps=6, warmup_steps=1, eval_interval=6, checkpoint_interval=6,
            log_interval=2, eval_batches=2, eval_tokens=200, lr=3e-3, min_lr=3e-4)


@pytest.mark.parametrize("divergence,temperature", [("reverse_kl", 0.5), ("forward_kl", 0.5)])
def test_distilling_padded_models_keeps_losses_finite(tmp_path, data_dir, tokenizer, divergence, temperature):
    assert tokenizer.vocab_size < 320  # both models below pad the vocabulary
    teacher = random_gpt(5)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(15.0)
    save_model(tmp_path / "t", teacher, tokenizer, stage="pretrain", settings={"data": str(data_dir)}, parent=data_dir)
    out = distill(DistillConfig(teacher=str(tmp_path / "t"), student="n_layer=1", out=str(tmp_path / "s"),
                                data=str(data_dir), kd_weight=1.0, ce_weight=0.0, divergence=divergence,
                                temperature=temperature, progress=False, **FAST), log=lambda m: None)
    m = read_manifest(out).metrics
    assert math.isfinite(m["train_kd"]) and m["train_kd"] < 100, m["train_kd"]
    assert math.isfinite(m["val_perplexity"])
    assert load_model(out).model.vocab_limit == tokenizer.vocab_size
