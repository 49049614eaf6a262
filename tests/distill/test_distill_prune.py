"""Structured pruning: slicing is exact, plans follow the scores, students load in transformers."""

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from compactgpt.artifacts import resolved_parent, load_model, read_manifest, save_model
from compactgpt.app.cli import main
from compactgpt.errors import ConfigError
from distill.importance import ActivationStats, collect_stats, head_square_sums, top_k_indices
from distill.prune import PruneConfig, PrunePlan, apply_plan, make_plan, prune, target_shape

from conftest import random_gpt, tiny_config

IDS = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))


def test_keep_everything_leaves_logits_unchanged():
    model = random_gpt(0, n_layer=3, n_inner=48)
    student = apply_plan(model, PrunePlan.keep_all(model.config))
    assert student.config == model.config
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, model(IDS).logits)


def test_permuted_plan_leaves_logits_unchanged():
    # A permutation of heads, channels and neurons is a relabelling of the same function:
    # equal logits check that every weight is sliced along the right axis.
    model = random_gpt(1, n_layer=2, n_head=4, n_embd=32, n_inner=40)
    g = torch.Generator().manual_seed(1)
    perm = lambda n: torch.randperm(n, generator=g).tolist()
    plan = PrunePlan([0, 1], {0: perm(4), 1: perm(4)}, perm(32), {0: perm(40), 1: perm(40)})
    with torch.no_grad():
        assert torch.allclose(apply_plan(model, plan)(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_pruning_an_identity_block_by_cosine_leaves_logits_unchanged():
    model = random_gpt(2, n_layer=3)
    with torch.no_grad():  # block 1 adds nothing to the residual stream
        for name in ("attn.c_proj", "mlp.c_proj"):
            lin = model.transformer.h[1].get_submodule(name)
            lin.weight.zero_()
            lin.bias.zero_()
    stats = collect_stats(model, [IDS])
    depth = stats.cosine_scores()
    assert depth[1].item() == pytest.approx(0.0, abs=1e-6) and (depth[[0, 2]] > 1e-4).all()
    plan = make_plan(stats, depth, target_shape(model.config, layers=2))
    assert plan.layers == [0, 2]
    with torch.no_grad():
        assert torch.allclose(apply_plan(model, plan)(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_plan_keeps_the_highest_scoring_units():
    n_layer, n_head = 2, 4
    stats = ActivationStats(
        tokens=1,
        heads={0: torch.tensor([1.0, 9.0, 4.0, 0.0]), 1: torch.tensor([5.0, 1.0, 0.0, 7.0])},
        neurons={i: torch.arange(8.0).flip(0) for i in range(n_layer)},
        channels=torch.tensor([0.0, 3, 1, 2, 9, 8, 7, 6]),
    )
    cfg = tiny_config(n_layer=n_layer, n_head=n_head, n_embd=8, n_inner=8)
    plan = make_plan(stats, torch.tensor([0.5, 0.1]), target_shape(cfg, layers=1, heads=2, mlp=3))
    assert plan.layers == [0]
    assert plan.heads == {0: [1, 2]}
    assert plan.channels == [4, 5, 6, 7]
    assert plan.neurons == {0: [0, 1, 2]}


def test_head_statistics_measure_each_heads_slice():
    y = torch.zeros(1, 2, 6)
    y[..., 2:4] = 1.0  # only head 1 of three 2-wide heads is active
    assert head_square_sums(y, 3).tolist() == [0.0, 4.0, 0.0]
    assert top_k_indices(torch.tensor([3.0, 3.0, 1.0]), 1) == [0]  # ties go to the lower index


def test_target_shape_follows_the_gpt2_width_rule():
    cfg = tiny_config(n_embd=32, n_head=4)  # 8-wide heads
    assert (target_shape(cfg, heads=3).n_embd, target_shape(cfg, embd=16).n_head) == (24, 2)
    s = target_shape(cfg, layers=1, heads=2, embd=16, mlp=20)
    assert (s.n_layer, s.n_head, s.n_embd, s.n_inner) == (1, 2, 16, 20)
    with pytest.raises(ConfigError, match="larger than the teacher's 4"):
        target_shape(cfg, heads=5)
    with pytest.raises(ConfigError, match="larger than the teacher's 128"):
        target_shape(cfg, mlp=200)
    with pytest.raises(ConfigError, match="not a multiple of the head width 8"):
        target_shape(cfg, embd=20)
    with pytest.raises(ConfigError, match="disagree"):
        target_shape(cfg, heads=3, embd=16)


def test_pruned_student_loads_in_transformers_with_equal_logits(tmp_path, byte_tokenizer):
    model = random_gpt(3, n_layer=3, n_inner=48)
    stats = collect_stats(model, [IDS])
    plan = make_plan(stats, stats.cosine_scores(), target_shape(model.config, layers=2, heads=2, mlp=20))
    student = apply_plan(model, plan).eval()
    save_model(tmp_path / "s", student, byte_tokenizer, stage="prune", settings={})
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    assert (hf.config.n_layer, hf.config.n_head, hf.config.n_embd, hf.config.n_inner) == (2, 2, 16, 20)
    with torch.no_grad():
        assert torch.allclose(student(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)
        n = byte_tokenizer.vocab_size  # the loaded student masks the padding rows past its tokenizer
        assert torch.allclose(load_model(tmp_path / "s").model(IDS).logits[..., :n], hf(IDS).logits[..., :n], atol=1e-5, rtol=0)


@pytest.fixture
def teacher_dir(tmp_path, data_dir, tokenizer):
    save_model(tmp_path / "teacher", random_gpt(4, n_layer=3), tokenizer, stage="pretrain",
               settings={"data": str(data_dir)}, parent=data_dir, metrics={"train_tokens": 100_000})
    return tmp_path / "teacher"


def test_prune_stage_writes_a_student_with_its_plan_and_perplexity(teacher_dir, tmp_path):
    out = prune(PruneConfig(model=str(teacher_dir), out=str(tmp_path / "s"), layers=2, heads=2, mlp=64,
                            calib_samples=8, calib_seq_len=32, eval_tokens=400, progress=False), log=lambda m: None)
    loaded = load_model(out)
    assert (loaded.model.config.n_layer, loaded.model.config.n_embd, loaded.model.config.n_inner) == (2, 16, 64)
    m = read_manifest(out)
    assert m.stage == "prune" and resolved_parent(out, m) == teacher_dir.resolve()
    assert not Path(m.parent["path"]).is_absolute()  # relative to the folder: the run can move
    assert len(m.extra["pruning_plan"]["layers"]) == 2 and len(m.extra["pruning_plan"]["channels"]) == 16
    assert m.extra["teacher"]["sha256"]
    assert m.metrics["val_perplexity"] > 1 and m.metrics["teacher_val_perplexity"] > 1
    assert m.metrics["non_embedding_ratio"] < 0.5


def test_prune_cli_rejects_impossible_targets_with_the_rule(teacher_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(teacher_dir), "--out", str(tmp_path / "s"), "--embd", "20"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "head width 8" in err and "n_embd" in err
    assert main(["prune", "--model", str(teacher_dir), "--out", str(tmp_path / "s"), "--layers", "9"]) == 2
    assert "larger than the teacher's 3" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
