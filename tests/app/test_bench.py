"""compactgpt bench: the timing harness, the Pareto front, the report from manifests alone,
and clear errors on bad model folders."""

from __future__ import annotations

import json
import time

import pytest
import torch

from compactgpt.app.bench import BenchConfig, artifact_kind, bench, check_models, measure, time_stream
from compactgpt.app.bench import run as bench_run
from compactgpt.app.cli import build_parser, main
from compactgpt.app.report import build_report, pareto_front, render_markdown, write_report
from compactgpt.artifacts import begin_write, finish_write, save_model
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.evaluation import model_logits_fn, perplexity

from conftest import random_gpt


def sleeping_stream(first_s: float, step_s: float, n: int):
    """A stub model: the first token after first_s (prefill), each later one after step_s."""
    def make():
        time.sleep(first_s)
        yield 0
        for _ in range(n - 1):
            time.sleep(step_s)
            yield 0
    return make


def test_timing_harness_reports_a_known_sleep():
    timing = time_stream(sleeping_stream(0.04, 0.02, 6), warmup=1, repeats=3)
    assert len(timing.ttft_s) == 3 and len(timing.step_s) == 15  # warm-up run not counted
    s = timing.summary(batch=4, prompt_tokens=16)
    assert s["step_ms_median"] == pytest.approx(20.0, rel=0.10)
    assert s["ttft_ms_median"] == pytest.approx(40.0, rel=0.10)
    assert s["decode_tok_s"] == pytest.approx(4 / 0.02, rel=0.10)
    assert s["step_ms_p90"] >= s["step_ms_median"]


def test_timing_with_a_fake_clock_is_exact():
    ticks = iter([0.0, 1.0, 1.5, 2.0, 10.0, 13.0, 13.25, 13.75])  # two runs of 3 tokens
    timing = time_stream(lambda: iter(range(3)), warmup=1, repeats=1, clock=lambda: next(ticks))
    assert timing.ttft_s == [3.0] and timing.step_s == [0.25, 0.5]
    s = timing.summary(batch=2, prompt_tokens=6)
    assert s["decode_tok_s"] == pytest.approx(2 / 0.375)
    assert s["prefill_tok_s"] == pytest.approx(12 / 3.0)


def test_timing_needs_two_tokens():
    with pytest.raises(ConfigError, match="decode steps"):
        time_stream(lambda: iter([0]), warmup=0, repeats=2)


def test_pareto_front_on_fixed_points():
    # (speed, perplexity): faster is better, lower perplexity is better.
    points = [(100, 20.0), (200, 21.0), (150, 25.0), (400, 30.0), (400, 31.0), (50, 19.0), (200, 21.0)]
    front = pareto_front(points)
    # (150, 25) is beaten by (200, 21); (400, 31) by (400, 30); the two equal (200, 21) both stay.
    assert front == [5, 0, 1, 6, 3]
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_bench_config_validates():
    with pytest.raises(ConfigError, match="batch_sizes"):
        BenchConfig(data="x", batch_sizes="1,a")
    with pytest.raises(ConfigError, match="new_tokens"):
        BenchConfig(data="x", new_tokens=1)
    assert BenchConfig(data="x", batch_sizes="1, 4").batches == [1, 4]
    with pytest.raises(ConfigError, match=r"bench: unknown settings \['repeat'\]"):
        BenchConfig.from_dict({"repeat": 3}, "bench")
    with pytest.raises(ConfigError, match="--names gives 1 names for 2 models"):
        BenchConfig(models=["a", "b"], names=["x"])
    with pytest.raises(ConfigError, match="distinct"):
        BenchConfig(models=["r1/m", "r2/m"])
    with pytest.raises(ConfigError, match="baseline 'z' is not one of the models"):
        BenchConfig(models=["a"], baseline="z")
    with pytest.raises(ConfigError, match="--models and --out"):
        bench(BenchConfig(data="x"))
    # What is measured and how the run goes are not settings of the figures.
    run = BenchConfig(models=["a"], names=["x"], baseline="x", out="o", data="d", device="cpu", overwrite=True,
                      progress=False, command="compactgpt bench")
    assert run.to_dict() == BenchConfig(data="d").to_dict()


def test_bench_flags_carry_their_help_and_defaults():
    verb = build_parser("bench")._subparsers._group_actions[0].choices["bench"]
    text = verb.format_help()
    for flag, words in (("--eval-tokens", "(default 32768)"), ("--batch-sizes", "the first is the headline"),
                        ("--memory", "(default True)"), ("--data", "prepared data folder")):
        assert flag in text and words in " ".join(text.split()), flag
    args = verb.parse_args(["--models", "m", "--out", "o", "--data", "d", "--repeats", "2", "--no-memory"])
    assert (args.repeats, args.memory, args.eval_tokens) == (2, False, None)  # unset flags keep the config's defaults


# ---------------------------------------------------------------------------------------
# The report from manifests alone


def _speed(tok_s: float, batch: int = 1) -> dict:
    return {"batch": batch, "decode_tok_s": tok_s, "step_ms_median": 1e3 / tok_s, "step_ms_p90": 1.1e3 / tok_s,
            "ttft_ms_median": 5.0, "ttft_ms_p90": 6.0, "prefill_tok_s": 1000.0, "runs": 3, "steps": 30}


def _measurement(ppl: float, tok_s: float, size: int) -> dict:
    return {"runtime": "pytorch", "parameters": 1000, "file_bytes": size, "perplexity": ppl, "nll": 1.0,
            "eval": {"data": "val split", "tokens": 100, "max_length": 64, "stride": 32},
            "speed": [_speed(tok_s), _speed(tok_s * 4, 8)],
            "memory": {"peak_rss_mib": 300.0, "runtime_baseline_rss_mib": 290.0, "model_rss_mib": 10.0}}


def test_report_renders_from_manifests_alone(tmp_path, byte_tokenizer):
    teacher = tmp_path / "teacher"
    save_model(teacher, random_gpt(0), byte_tokenizer, stage="pretrain", settings={"n_layer": 2, "n_embd": 32})
    student = tmp_path / "student"
    save_model(student, random_gpt(1, n_layer=1), byte_tokenizer, stage="distill", settings={"max_steps": 7},
               parent=teacher)
    slow = tmp_path / "slow"
    save_model(slow, random_gpt(2, n_layer=1), byte_tokenizer, stage="distill", settings={"max_steps": 1},
               parent=teacher)
    folders = {"teacher": str(teacher), "student": str(student), "bad-student": str(slow)}
    meas = {"teacher": _measurement(20.0, 100.0, 4000), "student": _measurement(21.0, 300.0, 1000),
            "bad-student": _measurement(30.0, 500.0, 1000)}
    report = build_report(folders, meas, {"prompt_tokens": 8, "new_tokens": 8, "batch_sizes": "1,8", "warmup": 1,
                                          "repeats": 3, "threads": 2},
                          {"cpu": "test cpu", "cores": 2, "memory_gib": 1.0, "versions": {"torch": "x"}},
                          command="compactgpt bench ...")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["student"]["x_faster"] == pytest.approx(3.0)
    assert rows["student"]["x_smaller"] == pytest.approx(4.0)
    assert rows["student"]["perplexity_delta"] == pytest.approx(0.05)
    assert rows["student"]["stages"] == ["distill", "pretrain"]  # lineage read from the manifests
    assert "distilled (7 steps) of teacher (2x32)" == rows["student"]["what"]
    # The faster student is 50% worse than the teacher: the headline is the one within 10%.
    assert report["headline"]["name"] == "student"
    assert all(rows[n]["pareto"] for n in rows)
    out = write_report(report, tmp_path / "report")
    md = (out / "report.md").read_text()
    assert "3.00x faster and 4.00x smaller than the teacher at +5.0% perplexity" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert "**teacher** (baseline)" in table[1]  # baseline row first after the header
    assert json.loads((out / "report.json").read_text())["baseline"] == "teacher"
    for png in ("pareto.png", "size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert render_markdown(json.loads((out / "report.json").read_text())) == md


# ---------------------------------------------------------------------------------------
# Measuring real artifacts


def test_bench_verb_runs_the_stage_from_its_flags(tmp_path, data_dir, tokenizer, capsys):
    lm = tmp_path / "lm"
    save_model(lm, random_gpt(6, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={})
    out = tmp_path / "out"
    code = main(["bench", "--models", str(lm), "--names", "teacher", "--data", str(data_dir), "--out", str(out),
                 "--eval-tokens", "200", "--prompt-tokens", "4", "--new-tokens", "3", "--batch-sizes", "1",
                 "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-memory", "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report == json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher"] and report["command"].startswith("compactgpt ")
    # The settings are the saved fields alone (data named relative to the report).
    want = BenchConfig(data="d", eval_tokens=200, prompt_tokens=4, new_tokens=3, batch_sizes="1", warmup=0, repeats=1,
                       threads=1, memory=False).to_dict()
    assert {**report["settings"], "data": "d"} == want


def test_measure_a_pytorch_artifact(tmp_path, data_dir, tokenizer):
    folder = tmp_path / "m"
    model = random_gpt(3, vocab_size=tokenizer.vocab_size)
    save_model(folder, model, tokenizer, stage="pretrain", settings={})
    cfg = BenchConfig(data=str(data_dir), eval_tokens=300, prompt_tokens=8, new_tokens=4, batch_sizes="1,2",
                      warmup=0, repeats=2, threads=1, memory=True, progress=False)
    record = measure(folder, cfg)
    from compactgpt.data import TokenShards

    tokens = torch.from_numpy(TokenShards(data_dir, "val").all_tokens().astype("int64"))[:300]
    want = perplexity(model_logits_fn(model), tokens, model.config.n_positions)
    assert record["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert record["runtime"] == "pytorch"
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert [s["batch"] for s in record["speed"]] == [1, 2]
    assert record["file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert record["memory"]["peak_rss_mib"] >= record["memory"]["runtime_baseline_rss_mib"] > 0


def test_folder_without_manifest_is_refused(tmp_path, byte_tokenizer):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        artifact_kind(folder)


def test_onnx_folder_without_tokenizer_is_refused_before_any_work(tmp_path, byte_tokenizer, data_dir, monkeypatch):
    good = tmp_path / "good"
    save_model(good, random_gpt(0), byte_tokenizer, stage="pretrain", settings={})
    onnx = begin_write(tmp_path / "onnx")
    (onnx / "model.onnx").write_bytes(b"not really")
    finish_write(onnx, "export", {}, files=["model.onnx"])
    with pytest.raises(ArtifactError, match="without tokenizer.json"):
        artifact_kind(onnx)
    monkeypatch.setattr(bench_run, "measure", lambda *a, **k: pytest.fail("measured before checking every folder"))
    with pytest.raises(ArtifactError, match="without tokenizer.json"):
        bench(BenchConfig(models=[str(good), str(onnx)], data=str(data_dir), out=str(tmp_path / "out")))
    with pytest.raises(ArtifactError):
        check_models([tmp_path / "missing"])


def test_cli_reports_bad_models_as_errors(tmp_path, data_dir, capsys):
    (tmp_path / "plain").mkdir()
    code = main(["bench", "--models", str(tmp_path / "plain"), "--data", str(data_dir), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_onnx_and_pytorch_measured_the_same_way(tmp_path, data_dir, tokenizer):
    from export import ExportConfig, export_onnx

    src = tmp_path / "m"
    save_model(src, random_gpt(4, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={})
    export_onnx(ExportConfig(model=str(src), out=str(tmp_path / "onnx")), log=lambda m: None)
    assert artifact_kind(tmp_path / "onnx") == "onnx"
    cfg = BenchConfig(data=str(data_dir), eval_tokens=200, prompt_tokens=4, new_tokens=3, batch_sizes="1",
                      warmup=0, repeats=1, threads=1, memory=False, progress=False)
    pt = measure(src, cfg)
    ort = measure(tmp_path / "onnx", cfg)
    assert ort["runtime"] == "onnx"
    assert ort["perplexity"] == pytest.approx(pt["perplexity"], rel=1e-4)
    assert ort["parameters"] == pt["parameters"]  # found through the export's parent
    # Against the PyTorch model it came from, the export's next-token distributions are the same
    # (KL ~ 0, same top-1 everywhere), and the perplexity is the one measured alone.
    both = measure(tmp_path / "onnx", cfg, reference=src)
    assert both["perplexity"] == pytest.approx(ort["perplexity"], rel=1e-9)
    assert both["divergence"]["kl_mean"] < 1e-6 and both["divergence"]["top1_agreement"] == 1.0
    assert measure(src, cfg, reference=src)["divergence"]["kl_mean"] == 0.0


def test_kl_against_the_baseline_grows_with_the_damage(tmp_path, data_dir, tokenizer):
    from quantize import RTNConfig, quantize_, save_quantized

    src = tmp_path / "m"
    save_model(src, random_gpt(4, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={})
    cfg = BenchConfig(data=str(data_dir), eval_tokens=200, prompt_tokens=4, new_tokens=3, batch_sizes="1",
                      warmup=0, repeats=1, threads=1, memory=False, progress=False)
    kl = {}
    for bits, group in ((8, 0), (4, 16)):
        model = random_gpt(4, vocab_size=tokenizer.vocab_size)
        config = RTNConfig(bits=bits, group_size=group, symmetric=False)
        quantize_(model, config)
        save_quantized(tmp_path / f"q{bits}", model, tokenizer, config, parent=src)
        kl[bits] = measure(tmp_path / f"q{bits}", cfg, reference=src)["divergence"]["kl_mean"]
    assert 0 < kl[8] < kl[4]


def test_classifier_gets_accuracy_in_its_own_table(tmp_path, data_dir, tokenizer):
    from compactgpt.finetune.classify import GPTClassifier, save_classifier

    data = tmp_path / "sms.tsv"
    data.write_text("".join(f"{'spam' if i % 3 == 0 else 'ham'}\tmessage number {i} here\n" for i in range(40)))
    clf = GPTClassifier(random_gpt(5, vocab_size=tokenizer.vocab_size), 2)
    lm = tmp_path / "lm"
    save_model(lm, random_gpt(6, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={})
    # The settings `compactgpt finetune --task classify` records (model and out included).
    save_classifier(tmp_path / "clf", clf, tokenizer, ["ham", "spam"], stage="finetune",
                    settings={"task": "classify", "data": str(data), "val_fraction": 0.25, "model": str(lm),
                              "out": str(tmp_path / "clf")})
    assert artifact_kind(tmp_path / "clf") == "classifier"
    cfg = BenchConfig(data=str(data_dir), eval_tokens=200, prompt_tokens=4, new_tokens=3, batch_sizes="1",
                      warmup=0, repeats=1, threads=1, memory=False, progress=False)
    out = bench(cfg.replace(models=[str(lm), str(tmp_path / "clf")], out=str(tmp_path / "out")), log=lambda m: None)
    assert out == tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    [c] = report["classifiers"]
    assert c["examples"] == 10 and 0.0 <= c["accuracy"] <= 1.0 and c["latency_ms_median"] > 0
    assert [r["name"] for r in report["rows"]] == ["lm"]
    assert "## Classifiers" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ConfigError, match="every model is a classifier"):
        bench(cfg.replace(models=[str(tmp_path / "clf")], out=str(tmp_path / "out2")))


def test_reports_name_folders_relative_to_the_report(tmp_path):
    from compactgpt.app.report import relative_folders

    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "onnx").mkdir()
    record = {"folder": str(tmp_path / "run" / "onnx"), "divergence": {"reference": str(tmp_path / "run" / "onnx")},
              "eval": {"data": f"val split of {tmp_path / 'run' / 'data'}"}, "settings": {"data": "@stdlib"}}
    rel = relative_folders(record, tmp_path / "run" / "report")
    assert rel == {"folder": "../onnx", "divergence": {"reference": "../onnx"}, "eval": {"data": "val split of ../data"},
                   "settings": {"data": "@stdlib"}}
