"""GGUF files for llama.cpp: tensors read back with the gguf package's own reader and
dequantizers equal the model's weights (codes bit for bit), the tokenizer travels inside,
and what GGUF cannot hold is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compactgpt.errors import ConfigError
from export.gguf import BLOCK_WRITERS, block_type, gguf_dequantized, read_gguf_weights, write_gguf
from export.llamacpp import ggml_gelu
from quantize import quantize_
from quantize.calibrate import CalibrationData
from quantize.config import RTNConfig, SmoothQuantConfig
from quantize.format import QuantizedWeight
from tests.conftest import random_gpt

gguf = pytest.importorskip("gguf")


def reader_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_float_model_reads_back_exactly(tmp_path, tokenizer):
    model = random_gpt(0)
    write_gguf(tmp_path / "m.gguf", model, tokenizer)
    weights = read_gguf_weights(tmp_path / "m.gguf")
    t = model.transformer
    n = tokenizer.vocab_size
    assert np.array_equal(weights["token_embd.weight"], t.wte.weight[:n].detach().numpy())
    assert np.array_equal(weights["position_embd.weight"], t.wpe.weight.detach().numpy())
    assert np.array_equal(weights["blk.1.attn_qkv.weight"], t.h[1].attn.c_attn.weight.detach().numpy())
    assert np.array_equal(weights["blk.1.ffn_norm.bias"], t.h[1].ln_2.bias.detach().numpy())
    assert np.array_equal(weights["output_norm.weight"], t.ln_f.weight.detach().numpy())
    assert "output.weight" not in weights  # the head is tied to the embedding
    assert len(weights) == 2 + 12 * model.config.n_layer + 2


def test_f16_rounds_each_weight_once(tmp_path, tokenizer):
    model = random_gpt(0)
    write_gguf(tmp_path / "m.gguf", model, tokenizer, float_type="F16")
    w = model.transformer.h[0].mlp.c_fc.weight.detach()
    assert np.array_equal(read_gguf_weights(tmp_path / "m.gguf")["blk.0.ffn_up.weight"], w.half().float().numpy())


@pytest.mark.parametrize("bits, symmetric, group, ggml_type", [
    (4, True, 32, "Q4_0"), (4, True, 64, "Q4_0"), (4, False, 32, "Q4_1"), (8, True, 32, "Q8_0"), (8, True, 0, "Q8_0")])
def test_quantized_codes_are_written_as_they_are(tmp_path, tokenizer, bits, symmetric, group, ggml_type):
    model = random_gpt(0, n_embd=64)
    quantize_(model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric, include_embeddings=True))
    tensors = {t.name: t for t in write_gguf(tmp_path / "q.gguf", model, tokenizer)}
    raw = reader_tensors(tmp_path / "q.gguf")
    weights = read_gguf_weights(tmp_path / "q.gguf")
    n = tokenizer.vocab_size
    for name, module in (("blk.0.attn_qkv.weight", model.transformer.h[0].attn.c_attn),
                         ("blk.1.ffn_down.weight", model.transformer.h[1].mlp.c_proj),
                         ("token_embd.weight", model.transformer.wte)):
        qw = module.qweight
        assert tensors[name].ggml_type == ggml_type and raw[name].tensor_type.name == ggml_type
        blocks = BLOCK_WRITERS[ggml_type](qw)[:n].numpy()
        assert np.array_equal(np.asarray(raw[name].data).reshape(blocks.shape), blocks)  # codes bit for bit
        assert np.array_equal(weights[name], gguf_dequantized(qw)[:n].numpy())
        # Scales that fp16 holds leave the weights as the artifact has them; Q4_1's min (scale x zero
        # point) is rounded to fp16, by at most half its unit in the last place.
        mins = (qw.scales * qw.zeros.float())[:n]
        bound = float(mins.abs().max()) * 2**-11 if ggml_type == "Q4_1" else 0.0
        assert np.abs(weights[name] - module.weight[:n].numpy()).max() <= bound


def test_tokenizer_travels_inside(tmp_path, tokenizer):
    write_gguf(tmp_path / "m.gguf", random_gpt(0), tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def field(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode() for i in f.data] if len(f.data) > 1 or f.types[0].name == "ARRAY" \
            else f.parts[f.data[0]].tolist()

    spec = json.loads(tokenizer.to_json())
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size
    assert all(tokens[i] == t for t, i in spec["model"]["vocab"].items())
    assert tokens[tokenizer.eot_id] == "<|endoftext|>"
    assert len(field("tokenizer.ggml.merges")) == len(spec["model"]["merges"])
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] == tokenizer.eot_id


def test_what_gguf_cannot_hold_is_refused_with_the_format_that_works(tmp_path, tokenizer):
    model = random_gpt(0)
    quantize_(model, RTNConfig(bits=4, group_size=16))
    with pytest.raises(ConfigError, match="multiple of 32.*--group-size 32"):
        write_gguf(tmp_path / "g.gguf", model, tokenizer)
    qw = model.transformer.h[0].attn.c_attn.qweight
    shuffled = QuantizedWeight(4, 32, qw.codes, qw.scales[:, :1], qw.zeros[:, :1], g_idx=torch.zeros(32))
    with pytest.raises(ConfigError, match="act-order"):
        block_type(shuffled, "blk.0.attn_qkv.weight")
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    smooth = random_gpt(0)
    quantize_(smooth, SmoothQuantConfig(), CalibrationData(ids, "test"))
    with pytest.raises(ConfigError, match="int8 activations"):
        write_gguf(tmp_path / "s.gguf", smooth, tokenizer)
    with pytest.raises(ConfigError, match="tanh GELU"):
        write_gguf(tmp_path / "e.gguf", random_gpt(0, activation_function="gelu"), tokenizer)
    assert not (tmp_path / "e.gguf").exists()


def test_export_stage_writes_a_checked_gguf_folder(tmp_path, tokenizer):
    from compactgpt.artifacts import read_manifest, save_model
    from compactgpt.app.cli import main
    from compactgpt.app.kinds import folder_kind
    from export import ExportConfig, export
    from quantize import QuantizeConfig, quantize_folder

    save_model(tmp_path / "float", random_gpt(0, n_embd=64), tokenizer, stage="pretrain", settings={})
    quantize_folder(QuantizeConfig(model=str(tmp_path / "float"), out=str(tmp_path / "int4"),
                                   method=RTNConfig(bits=4, group_size=32, include_embeddings=True, head_bits=8),
                                   progress=False), log=lambda m: None)
    out = export(ExportConfig(model=str(tmp_path / "int4"), out=str(tmp_path / "gguf"), format="gguf"),
                 log=lambda m: None)
    manifest = read_manifest(out)
    assert folder_kind(out) == "gguf" and manifest.stage == "export"
    assert manifest.extra["tensor_types"] == {"Q4_0": 8, "Q8_0": 1, "F32": 1 + 2 * 8 + 2}  # positions; per block 2 norms and 4 biases; ln_f
    assert manifest.extra["verify"]["codes_equal"] and manifest.metrics["max_weight_change"]["Q4_0"] == 0.0
    assert manifest.settings["format"] == "gguf" and "model.gguf" in manifest.files
    # A file changed after the export no longer matches the manifest's hash.
    with open(out / "model.gguf", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    from compactgpt.artifacts import verify_files
    from compactgpt.errors import ArtifactError
    with pytest.raises(ArtifactError):
        verify_files(out, manifest)
    # GGUF folders are llama.cpp's to run: eval says so in one line.
    assert main(["eval", "--model", str(out)]) == 2


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_gguf_as_pytorch_does(tmp_path, tokenizer, corpus_dir):
    """llama.cpp (its Python binding) tokenizes as CompactGPT does and computes PyTorch's logits
    within float rounding. What remains is ggml's fp16 GELU table: with that one op computed
    the same way in PyTorch, the logits agree to float32 rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from compactgpt.artifacts import save_model
    from export import ExportConfig, export

    model = random_gpt(0)
    save_model(tmp_path / "m", model, tokenizer, stage="pretrain", settings={})
    out = export(ExportConfig(model=str(tmp_path / "m"), out=str(tmp_path / "gguf"), format="gguf"), log=lambda m: None)
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=model.config.n_positions, logits_all=True,
                          verbose=False, n_threads=1, type_k=0, type_v=0)  # float32 KV cache
    text = sorted(corpus_dir.glob("*.py"))[0].read_text()
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    ids = tokenizer.encode(text)[: model.config.n_positions]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])[:, : tokenizer.vocab_size]

    def pytorch_logits():
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, :, : tokenizer.vocab_size].numpy()

    assert np.abs(theirs - pytorch_logits()).max() < 2e-3
    for block in model.transformer.h:
        block.mlp.act = ggml_gelu
    assert np.abs(theirs - pytorch_logits()).max() < 1e-4
