"""Unstructured and N:M sparsity: scores, masks, and Wanda on a known activation pattern."""

import pytest
import torch

from compactgpt.artifacts import read_manifest, save_model
from compactgpt.errors import ConfigError
from distill.importance import block_linears, collect_stats
from distill.sparsity import (MaskKeeper, SparsifyConfig, compute_masks, magnitude_scores, n_m_mask, sparsify,
                              unstructured_mask, wanda_scores)

from conftest import random_gpt


def test_wanda_removes_the_weights_on_weak_inputs():
    # Equal |W| everywhere; input feature j has norm j + 1: Wanda drops the low half of each row.
    torch.manual_seed(0)
    w = torch.sign(torch.randn(4, 8))
    x = torch.arange(1.0, 9.0).repeat(16, 1)  # 16 positions, feature j constant at j + 1
    norms = x.pow(2).sum(0).sqrt()
    mask = unstructured_mask(wanda_scores(w, norms), 0.5, per_row=True)
    assert mask[:, :4].sum() == 0 and mask[:, 4:].all()


def test_wanda_keeps_small_weights_on_large_inputs_where_magnitude_does_not():
    w = torch.tensor([[10.0, 1.0, 2.0, 3.0]])
    norms = torch.tensor([0.01, 100.0, 1.0, 1.0])  # the big weight reads an almost silent input
    wanda = unstructured_mask(wanda_scores(w, norms), 0.5, per_row=True)
    magnitude = unstructured_mask(magnitude_scores(w), 0.5, per_row=True)
    assert wanda.tolist() == [[False, True, False, True]]
    assert magnitude.tolist() == [[True, False, False, True]]


def test_wanda_on_a_model_uses_the_calibration_activations():
    # Make one input channel of every MLP c_fc dominate the activations: Wanda must keep
    # its column in every row even though its weights are the smallest.
    model = random_gpt(0)
    fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight[:, 5] = 1e-3 * torch.sign(fc.weight[:, 5])
        model.transformer.h[0].ln_2.bias[5] = 50.0  # ln_2 output feeds c_fc
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, [ids], linear_inputs=True)
    norms = {n: stats.input_norms(n) for n in stats.inputs}
    name = "transformer.h.0.mlp.c_fc"
    x = model.transformer.h[0].ln_2(model.transformer.h[0].attn(model.transformer.h[0].ln_1(
        model.transformer.wte(ids) + model.transformer.wpe(torch.arange(16)[None])), None, None)[0]
        + model.transformer.wte(ids) + model.transformer.wpe(torch.arange(16)[None]))
    assert torch.allclose(norms[name], x.detach().pow(2).sum((0, 1)).sqrt(), rtol=1e-4)
    wanda = compute_masks(model, "wanda", 0.5, "unstructured", norms)[name]
    magnitude = compute_masks(model, "magnitude", 0.5, "unstructured")[name]
    assert wanda[:, 5].all() and not magnitude[:, 5].any()


def test_unstructured_mask_hits_the_exact_count():
    scores = torch.rand(6, 10)
    assert (~unstructured_mask(scores, 0.3, per_row=True)).sum(1).tolist() == [3] * 6
    assert (~unstructured_mask(scores, 0.25, per_row=False)).sum().item() == 15
    whole = unstructured_mask(scores, 0.5, per_row=False)
    assert scores[whole].min() >= scores[~whole].max()


def test_two_four_keeps_the_two_largest_of_every_four():
    scores = torch.tensor([[4.0, 1, 3, 2, 0, 9, 8, 7]])
    assert n_m_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    mask = n_m_mask(torch.rand(5, 16), 2, 4)
    assert (mask.reshape(5, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ConfigError, match="multiple of 4"):
        n_m_mask(torch.rand(2, 10), 2, 4)


def test_sparsity_config_errors():
    with pytest.raises(ConfigError, match="50% sparse by construction"):
        SparsifyConfig(model="m", out="o", pattern="2:4", sparsity=0.3)
    with pytest.raises(ConfigError, match="N:M"):
        SparsifyConfig(model="m", out="o", pattern="2of4")
    with pytest.raises(ConfigError, match="unknown"):
        SparsifyConfig(model="m", out="o", method="random")
    assert SparsifyConfig(model="m", out="o", pattern="1:4").target() == 0.75


def test_mask_keeper_holds_zeros_through_optimizer_steps():
    model = random_gpt(1).train()
    masks = compute_masks(model, "magnitude", 0.5, "2:4")
    keeper = MaskKeeper(model, masks)
    keeper(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 320, (2, 12))
    for step in range(3):
        model(ids).logits.logsumexp(-1).mean().backward()
        name, lin = next(iter(block_linears(model).items()))
        assert (lin.weight.grad[~masks[name]] == 0).all()
        opt.step()
        opt.zero_grad()
        keeper(step)
    for name, lin in block_linears(model).items():
        assert (lin.weight[~masks[name]] == 0).all()
    keeper.remove()


def test_sparsify_stage_reports_sparsity_and_perplexity(tmp_path, data_dir, tokenizer):
    save_model(tmp_path / "m", random_gpt(2), tokenizer, stage="pretrain", settings={}, parent=data_dir)
    out = sparsify(SparsifyConfig(model=str(tmp_path / "m"), out=str(tmp_path / "s"), pattern="2:4",
                                  calib_samples=4, calib_seq_len=32, eval_tokens=300, progress=False), log=lambda m: None)
    m = read_manifest(out)
    assert m.stage == "sparsify" and m.metrics["sparsity"] == pytest.approx(0.5)
    assert m.extra["sparsity"]["pattern"] == "2:4" and m.metrics["dense_val_perplexity"] > 1
