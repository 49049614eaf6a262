"""The distillation stage end to end on tiny models: it learns the teacher, records what it did,
holds sparsity masks, and refuses mismatched tokenizers."""

import json

import pytest
import torch

from compactgpt.artifacts import resolved_parent, load_model, read_manifest, save_model
from compactgpt.app.cli import main
from compactgpt.data import DataConfig, prepare_data
from compactgpt.errors import ConfigError
from distill.distill import DistillConfig, distill, hidden_layer_map, parse_student_shape, training_window
from distill.importance import block_linears
from distill.losses import forward_kl
from distill.prune import PruneConfig, prune
from distill.sparsity import SparsifyConfig, sparsify

from conftest import random_gpt

QUIET = dict(log=lambda m: None)
FAST = dict(block_size=32, batch_size=4, max_steps=12, warmup_steps=2, eval_interval=12, checkpoint_interval=12,
            log_interval=4, eval_batches=4, eval_tokens=300, lr=3e-3, min_lr=3e-4, progress=False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir, tokenizer):
    root = tmp_path_factory.mktemp("distill")
    teacher = random_gpt(5, n_layer=2)
    with torch.no_grad():  # sharper distributions than random init gives: something to learn
        teacher.transformer.wte.weight.mul_(15.0)
    save_model(root / "teacher", teacher, tokenizer, stage="pretrain",
               settings={"data": str(data_dir)}, parent=data_dir, metrics={"train_tokens": 10_000})
    return root / "teacher"


@pytest.fixture(scope="module")
def pruned_dir(teacher_dir):
    out = teacher_dir.parent / "pruned"
    prune(PruneConfig(model=str(teacher_dir), out=str(out), heads=2, mlp=32, calib_samples=8, calib_seq_len=32,
                      eval_tokens=300), **QUIET)
    return out


def kl_to_teacher(student, teacher, data_dir):
    from compactgpt.data import TokenShards

    windows = TokenShards(data_dir, "val").fixed_windows(4, 32)
    x = torch.cat([w for w, _ in windows])
    with torch.no_grad():
        return forward_kl(student(x).logits, teacher(x).logits).item()


def test_distilling_a_pruned_student_brings_it_closer_to_the_teacher(teacher_dir, pruned_dir, data_dir, tmp_path):
    teacher = load_model(teacher_dir).model
    before = kl_to_teacher(load_model(pruned_dir).model, teacher, data_dir)
    out = distill(DistillConfig(teacher=str(teacher_dir), student=str(pruned_dir), out=str(tmp_path / "s"),
                                kd_weight=1.0, ce_weight=0.0, temperature=2.0, **FAST), **QUIET)
    after = kl_to_teacher(load_model(out).model, teacher, data_dir)
    assert after < 0.8 * before
    m = read_manifest(out)
    assert m.stage == "distill" and resolved_parent(out, m) == pruned_dir.resolve()
    assert (out / m.extra["teacher"]["path"]).resolve() == teacher_dir.resolve()
    assert m.extra["pruning_plan"]["shape"]["n_head"] == 2
    assert m.extra["losses"]["temperature"] == 2.0 and m.extra["losses"]["teacher_run"]
    assert m.extra["tokens"] == 12 * 4 * 32 == m.metrics["train_tokens"]
    assert m.metrics["token_fraction_of_teacher"] == pytest.approx(12 * 4 * 32 / 10_000)
    assert m.metrics["teacher_val_perplexity"] > 1 and "perplexity_delta" in m.metrics
    assert m.settings["kd_weight"] == 1.0


def test_cross_entropy_only_trains_without_the_teacher(teacher_dir, tmp_path, monkeypatch):
    import compactgpt.model as model_mod

    calls = {"n": 0}
    forward = model_mod.GPT.forward

    def counting(self, *a, **k):
        calls["n"] += self.config.n_layer == 1  # the student below has 1 layer, the teacher 2
        return forward(self, *a, **k)

    monkeypatch.setattr(model_mod.GPT, "forward", counting)
    out = distill(DistillConfig(teacher=str(teacher_dir), student="n_layer=1,n_embd=16,n_head=2",
                                out=str(tmp_path / "ce"), kd_weight=0.0, ce_weight=1.0, **FAST), **QUIET)
    m = read_manifest(out)
    assert not m.extra["losses"]["teacher_run"] and m.extra["student_init"].startswith("random")
    history = [json.loads(l) for l in (tmp_path / "ce" / "log.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if h["event"] == "train"]
    assert losses[-1] < losses[0]
    cfg = load_model(out).model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_inner) == (1, 16, 64)


def test_hidden_state_loss_with_a_projection_trains(teacher_dir, pruned_dir, tmp_path):
    out = distill(DistillConfig(teacher=str(teacher_dir), student=str(pruned_dir), out=str(tmp_path / "h"),
                                hidden_weight=1.0, **{**FAST, "max_steps": 4}), **QUIET)
    m = read_manifest(out)
    assert m.extra["losses"]["hidden_pairs"] == [[1, 1], [2, 2]]
    log = [json.loads(l) for l in (tmp_path / "h" / "log.jsonl").read_text().splitlines()]
    assert any("train_hidden" in r for r in log if r.get("event") == "eval")


def test_sparse_student_keeps_its_zeros_through_distillation(teacher_dir, tmp_path):
    sparse = sparsify(SparsifyConfig(model=str(teacher_dir), out=str(tmp_path / "sp"), sparsity=0.6,
                                     calib_samples=4, calib_seq_len=32, eval_tokens=300), **QUIET)
    zeros = {n: (l.weight == 0) for n, l in block_linears(load_model(sparse).model).items()}
    out = distill(DistillConfig(teacher=str(teacher_dir), student=str(sparse), out=str(tmp_path / "d"),
                                **{**FAST, "max_steps": 5}), **QUIET)
    student = load_model(out).model
    for name, lin in block_linears(student).items():
        assert (lin.weight[zeros[name]] == 0).all()
    reached = read_manifest(sparse).metrics["sparsity"]  # floor(0.6 x inputs) per row
    assert 0.59 < reached <= 0.6 and read_manifest(out).metrics["sparsity"] >= reached


def test_tokenizer_mismatch_is_a_clear_error(teacher_dir, tmp_path, byte_tokenizer, corpus_dir):
    save_model(tmp_path / "other", random_gpt(6), byte_tokenizer, stage="test", settings={})
    with pytest.raises(ConfigError, match="different tokenizers"):
        distill(DistillConfig(teacher=str(teacher_dir), student=str(tmp_path / "other"), out=str(tmp_path / "x"),
                              **FAST), **QUIET)
    other_data = prepare_data(DataConfig(source=str(corpus_dir), vocab_size=280, out=str(tmp_path / "data280")),
                              log=lambda m: None)
    with pytest.raises(ConfigError, match="different tokenizers"):
        distill(DistillConfig(teacher=str(teacher_dir), student="n_layer=1", data=str(other_data),
                              out=str(tmp_path / "y"), **FAST), **QUIET)


def test_bad_settings_are_clear_errors(teacher_dir, tmp_path, capsys):
    base = ["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "z")]
    assert main(base + ["--student", "n_layers=2"]) == 2
    assert "n_layers=2" in capsys.readouterr().err
    assert main(base + ["--student", "n_layer=two"]) == 2
    assert "is not a number" in capsys.readouterr().err
    assert main(base + ["--student", "n_embd=24,n_head=5"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(base + ["--student", "n_layer=1", "--kd-weight", "0"]) == 2
    assert "both 0" in capsys.readouterr().err
    assert main(base + ["--student", "n_layer=1", "--block-size", "100"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_the_default_window_follows_the_models(teacher_dir, tmp_path):
    """No fixed default can exceed a model: the window is the shorter context of the two,
    saved as the size used; a size given that exceeds either is an error naming it."""
    assert training_window(0, 64, 32) == 32 and training_window(16, 64, 32) == 16
    with pytest.raises(ConfigError, match="exceeds the student's 32 positions"):
        training_window(48, 64, 32)
    settings = {**FAST, "block_size": 0, "max_steps": 2, "eval_interval": 2, "checkpoint_interval": 2}
    out = distill(DistillConfig(teacher=str(teacher_dir), student="n_layer=1,n_positions=32", out=str(tmp_path / "w"),
                                **settings), **QUIET)
    assert read_manifest(out).settings["block_size"] == 32
    assert DistillConfig.__dataclass_fields__["block_size"].default == 0


def test_student_shapes_and_layer_maps():
    assert parse_student_shape("n_layer=2, n_inner=96,dropout=0.1") == {"n_layer": 2, "n_inner": 96, "dropout": 0.1}
    teacher, student = random_gpt(0, n_layer=4), random_gpt(0, n_layer=2)
    assert hidden_layer_map(student, teacher, None) == [(1, 2), (2, 4)]
    assert hidden_layer_map(student, teacher, {"layers": [0, 3]}) == [(1, 1), (2, 4)]
    assert hidden_layer_map(student, teacher, {"layers": [1, 2]}) == [(1, 2), (2, 4)]


def test_distill_cli_end_to_end(teacher_dir, pruned_dir, tmp_path, capsys):
    code = main(["distill", "--teacher", str(teacher_dir), "--student", str(pruned_dir), "--out", str(tmp_path / "c"),
                 "--max-steps", "3", "--block-size", "32", "--batch-size", "2", "--eval-interval", "3",
                 "--eval-batches", "2", "--eval-tokens", "200", "--divergence", "reverse_kl", "--no-progress"])
    assert code == 0
    assert read_manifest(tmp_path / "c").settings["divergence"] == "reverse_kl"
    # A second run into the same folder must not silently replace the first.
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(pruned_dir), "--out", str(tmp_path / "c"),
                 "--max-steps", "3", "--block-size", "32", "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_out_may_not_be_an_input(teacher_dir, pruned_dir):
    for out in (teacher_dir, pruned_dir):
        with pytest.raises(ConfigError, match="--out must differ"):
            distill(DistillConfig(teacher=str(teacher_dir), student=str(pruned_dir), out=str(out), **FAST), **QUIET)


def test_every_flag_of_the_distill_verbs_has_help():
    from compactgpt.app.cli import build_parser

    for verb in ("prune", "sparsify", "distill"):
        parser = build_parser(verb)
        sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
        flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert len(flags) > 10 and all(a.help for a in flags), verb
