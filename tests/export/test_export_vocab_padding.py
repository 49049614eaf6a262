"""The exported graph masks the logits of embedding rows past the tokenizer (padding), so no
runtime's argmax or sampling picks them; the output keeps its name and (B, T, V) shape and
validation against PyTorch still holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compactgpt.artifacts import load_model, read_manifest, save_model
from compactgpt.app.cli import main
from export import ExportConfig, OnnxDecoder, export_onnx
from export.errors import ParityError
from export.graph import BuildOptions, build_decoder, collect_projections
from export.spec import DecoderSpec
from export.validate import validate
from tests.conftest import random_gpt, winning_padding

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def padded(tmp_path_factory, byte_tokenizer_module):
    """A model folder whose 320 - n padding rows would win every position unmasked."""
    tok = byte_tokenizer_module
    folder = tmp_path_factory.mktemp("padded") / "model"
    save_model(folder, winning_padding(random_gpt(0), tok.vocab_size), tok, stage="pretrain", settings={})
    return folder


@pytest.fixture(scope="module")
def byte_tokenizer_module():
    from compactgpt.tokenizer import train_bpe

    return train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)


@pytest.mark.parametrize("settings", [dict(), dict(optimize=False), dict(dtype="fp16")], ids=["fused", "unfused", "fp16"])
def test_exported_logits_of_padding_rows_are_masked_and_never_generated(padded, tmp_path, settings):
    n = load_model(padded).tokenizer.vocab_size
    out = export_onnx(ExportConfig(model=str(padded), out=str(tmp_path / "onnx"), **settings), **QUIET)
    decoder = OnnxDecoder(out)
    logits = decoder.logits(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 320)  # the output keeps the embedding's V
    lowest = float(np.finfo(np.float16 if settings.get("dtype") == "fp16" else np.float32).min)
    assert (logits[..., n:] == lowest).all() and torch.isfinite(logits).all()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    greedy = decoder.generate(ids, 12)
    assert (greedy[:, 4:] < n).all()
    if not settings:  # float32: token for token what the PyTorch folder generates
        assert torch.equal(greedy, load_model(padded).model.generate(ids, 12))
    sampled = decoder.generate(ids, 12, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert (sampled[:, 4:] < n).all()
    assert read_manifest(out).metrics["parity_max_logits_diff"] < 0.05


def test_cli_generate_on_the_export_never_emits_padding(padded, tmp_path, capsys):
    out = export_onnx(ExportConfig(model=str(padded), out=str(tmp_path / "onnx")), **QUIET)
    args = ["generate", "--model", str(out), "--prompt", "def f", "--max-new-tokens", "8", "--temperature", "0",
            "--no-stop"]
    assert main(args) == 0
    onnx_text = capsys.readouterr().out
    assert main(args[:2] + [str(padded)] + args[3:]) == 0
    assert capsys.readouterr().out == onnx_text


def test_validation_refuses_a_graph_that_does_not_mask_the_padding(padded):
    import onnxruntime as ort

    model = load_model(padded).model  # masks its padding rows; the graph below does not
    proto = build_decoder(model, collect_projections(model), BuildOptions())
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ParityError, match="padding rows"):
        validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)
    masked = build_decoder(model, collect_projections(model), BuildOptions(n_tokens=model.vocab_limit))
    session = ort.InferenceSession(masked.SerializeToString(), providers=["CPUExecutionProvider"])
    assert validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)["max_logits_diff"] < 1e-4


def test_a_quantized_head_is_masked_too(padded, tmp_path):
    pytest.importorskip("quantize.api")
    from quantize import RTNConfig, load_quantized, save_quantized
    from quantize.api import quantize_

    loaded = load_model(padded)
    quantize_(loaded.model, RTNConfig(bits=8, group_size=0, include_embeddings=True))
    save_quantized(tmp_path / "q", loaded.model, loaded.tokenizer, RTNConfig(bits=8, group_size=0, include_embeddings=True))
    n = loaded.tokenizer.vocab_size
    q = load_quantized(tmp_path / "q")
    assert q.model.vocab_limit == n
    ids = torch.tensor([[1, 2, 3, 4]])
    assert (q.model.generate(ids, 8)[:, 4:] < n).all()
    out = export_onnx(ExportConfig(model=str(tmp_path / "q"), out=str(tmp_path / "onnx"), accuracy_level=0), **QUIET)
    logits = OnnxDecoder(out).logits(ids)
    assert (logits[..., n:] == np.finfo(np.float32).min).all()
    assert torch.equal(OnnxDecoder(out).generate(ids, 8), q.model.generate(ids, 8))
