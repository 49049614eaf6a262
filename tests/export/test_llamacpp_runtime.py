"""GGUF exports run in llama.cpp behind the same verbs as every other artifact: eval, generate
and bench open them through llama-cpp-python, and where it is missing they say so in one line
(bench keeps measuring the other rows)."""

from __future__ import annotations

import sys

import pytest
import torch

from compactgpt.app.bench import BenchConfig, bench, measure
from compactgpt.app.cli import main
from compactgpt.app.open import open_model
from compactgpt.app.report import load_report
from compactgpt.artifacts import save_model
from compactgpt.errors import ConfigError
from tests.conftest import random_gpt

pytest.importorskip("gguf")


@pytest.fixture
def gguf_export(tmp_path, tokenizer):
    """(float folder, its F32 GGUF export) of a tiny random model."""
    from export import ExportConfig, export

    src = tmp_path / "m"
    save_model(src, random_gpt(4, vocab_size=tokenizer.vocab_size), tokenizer, stage="pretrain", settings={})
    out = export(ExportConfig(model=str(src), out=str(tmp_path / "gguf"), format="gguf"), log=lambda m: None)
    return src, out


@pytest.fixture
def without_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError


def bench_config(data_dir, **kw):
    return BenchConfig(data=str(data_dir), eval_tokens=200, prompt_tokens=4, new_tokens=3, batch_sizes="1,2",
                       warmup=0, repeats=1, threads=1, memory=False, progress=False, **kw)


def test_without_the_binding_each_verb_names_the_install(gguf_export, without_llama_cpp, capsys):
    _, out = gguf_export
    with pytest.raises(ConfigError, match=r"llama-cpp-python is not installed: pip install -e '\.\[llamacpp\]'"):
        open_model(out)
    for verb in (["eval", "--model", str(out)], ["generate", "--model", str(out), "--prompt", "def"]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install -e '.[llamacpp]'" in err


def test_bench_keeps_the_other_rows_and_says_why_gguf_is_absent(tmp_path, data_dir, gguf_export, without_llama_cpp):
    src, out = gguf_export
    bench(bench_config(data_dir, models=[str(src), str(out)], names=["float", "gguf"], out=str(tmp_path / "r")),
          log=lambda m: None)
    report = load_report(tmp_path / "r" / "report.json")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["float"]["perplexity"] > 1
    absent = [r for r in report.get("absent", report["rows"]) if r.get("name") == "gguf"]
    assert absent and "llama-cpp-python is not installed" in absent[0]["absent"]
    assert "llama-cpp-python is not installed" in (tmp_path / "r" / "report.md").read_text()
    # A baseline that cannot run leaves nothing to compare against: refused before any work.
    with pytest.raises(ConfigError, match="baseline .* cannot run here: llama-cpp-python"):
        bench(bench_config(data_dir, models=[str(src), str(out)], names=["float", "gguf"], baseline="gguf",
                           out=str(tmp_path / "r2")), log=lambda m: None)


@pytest.mark.llamacpp
def test_llama_cpp_scores_and_generates_as_pytorch_does(tmp_path, data_dir, tokenizer, gguf_export):
    """Same perplexity within float rounding, KL ~ 0 from the PyTorch model, the same greedy
    tokens through the one sampling loop; bench times it at batch 1 only."""
    pytest.importorskip("llama_cpp")
    src, out = gguf_export
    cfg = bench_config(data_dir)
    pt = measure(src, cfg)
    lc = measure(out, cfg, reference=src)
    assert lc["runtime"] == "gguf" and lc["file_bytes"] == (out / "model.gguf").stat().st_size
    assert lc["perplexity"] == pytest.approx(pt["perplexity"], rel=1e-3)
    assert lc["divergence"]["kl_mean"] < 1e-4 and lc["divergence"]["top1_agreement"] > 0.99
    assert [s["batch"] for s in lc["speed"]] == [1] and lc["speed"][0]["decode_tok_s"] > 0
    assert lc["parameters"] == pt["parameters"]

    prompt = torch.tensor([tokenizer.encode("def read(path):")])
    theirs = open_model(out, threads=1).runner.generate(prompt, 20)
    ours = open_model(src, device="cpu").runner.generate(prompt, 20)
    assert torch.equal(theirs, ours)
    with pytest.raises(ConfigError, match="one sequence per context"):
        next(open_model(out, threads=1).stream(prompt.repeat(2, 1), 4))
