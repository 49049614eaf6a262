"""Quantization: packing, the integer grid, GPTQ / AWQ / SmoothQuant math, quantize_, artifacts, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactgpt.artifacts import save_model
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.model import mask_padded_vocab
from quantize import (AWQConfig, BnbInt8Config, BnbNF4Config, GPTQConfig, QuantizedWeight, RTNConfig,
                      SmoothQuantConfig, load_quantized, pack_int4, quantize_, quantized_linears, unpack_int4)
from quantize.calibrate import CalibrationData
from quantize.artifact import layout_for, save_quantized
from quantize.awq import fake_quantize_groups, search_clip, search_scales, search_scales_through
from quantize.format import from_gptq_tensors, gptq_tensors
from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.modules import QuantEmbedding, quantize_activations_per_token
from quantize.rtn import rtn_quantize
from quantize.smoothquant import fold_scales, fold_scales_into_values, smoothing_scales

from conftest import random_gpt

warnings.filterwarnings("ignore")


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and a few large-magnitude channels, like a
    transformer's LayerNorm outputs."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim // 4, dim, generator=g)
    x = torch.randn(n, dim // 4, generator=g) @ basis + 0.1 * torch.randn(n, dim, generator=g)
    x[:, :4] *= 8.0
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).item()


# ---------------------------------------------------------------------------------------
# Format


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), half=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_int4_round_trips_exactly(rows, half, seed):
    codes = torch.randint(0, 16, (rows, 2 * half), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (rows, half) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # Low nibble is the even column.
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_pack_int4_rejects_bad_codes():
    with pytest.raises(ConfigError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="< 16"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("permuted", [False, True])
def test_gptq_layout_round_trips_exactly(bits, permuted):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (16, 64), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (16, 4), generator=g, dtype=torch.uint8)
    scales = torch.rand(16, 4, generator=g) + 0.01
    g_idx = (torch.randperm(64, generator=g) // 16).to(torch.int32) if permuted else None
    qw = QuantizedWeight(bits, 16, codes, scales, zeros, g_idx)
    t = gptq_tensors(qw)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64 * bits // 32, 16)
    back = from_gptq_tensors(t, bits)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros) and torch.equal(back.scales, scales)
    assert (back.g_idx is None) == (not permuted)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_quantized_weight_validates_shapes():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantizedWeight(4, 3, codes, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="scales"):
        QuantizedWeight(4, 4, codes, torch.ones(4, 3), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="bits=3"):
        QuantizedWeight(3, 4, codes, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------
# Round to nearest


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 64, True), (8, 64, False), (4, 16, True),
                                                       (4, 16, False), (4, 32, True)])
def test_rtn_within_half_a_step(bits, group_size, symmetric):
    """The midpoint grid spans every group's range: no weight moves more than half a step."""
    w = torch.randn(24, 64) * torch.linspace(0.1, 3, 64)
    w[3, :16] = 0  # an all-zero group
    w[5] = w[5].abs()  # an all-positive row (asymmetric zero point at the bottom)
    qw = rtn_quantize(w, bits, group_size, symmetric, full=False)
    assert int(qw.codes.max()) < 2**bits
    step = qw.scales[:, qw.group_index()]
    assert torch.all((qw.dequantize() - w).abs() <= step / 2 * (1 + 1e-6))
    assert torch.equal(qw.scales.half().float(), qw.scales)  # exactly storable as float16
    if symmetric:
        assert torch.all(qw.zeros == 2 ** (bits - 1))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_full_grid_uses_every_code_and_beats_the_midpoint_grid(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * torch.linspace(0.1, 3, 128)
    w[3, :32] = 0  # an all-zero group decodes to zeros
    errors = {}
    for full, search in ((False, False), (True, False), (True, True)):
        qw = rtn_quantize(w, bits, 32, True, full=full, search=search)
        assert torch.equal(qw.scales.half().float(), qw.scales) and torch.all(qw.zeros == 2 ** (bits - 1))
        assert torch.equal(qw.dequantize()[3, :32], torch.zeros(32))
        deq = qw.dequantize()
        errors[full, search] = float((w * w * (deq - w) ** 2).sum())  # the score the search minimizes
        if full and bits == 4:
            assert int(qw.codes.min()) == 0 and int(qw.codes.max()) == 15
    assert errors[True, True] < errors[True, False]
    if bits == 4:  # Q4_0's rule against the midpoint grid: one more code, no clipped extreme
        assert errors[True, False] < errors[False, False]
        plain = rtn_quantize(w, 4, 32, True, search=False)
        # Q4_0's rule: each group's signed extreme decodes exactly (code 0, a negative step for a positive extreme).
        groups = w.reshape(256, 4, 32)
        extreme = torch.gather(groups, -1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        assert torch.all(torch.sign(plain.scales[extreme != 0]) == -torch.sign(extreme[extreme != 0]))


@pytest.mark.parametrize("gguf_exact", [False, True])
def test_the_asymmetric_step_search_beats_the_plain_range(gguf_exact):
    from quantize.rtn import _fp16_exact

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g).pow(3) * torch.linspace(0.1, 3, 128)  # heavy tails: clipping pays
    w[3, :32] = 0
    w[5] = w[5].abs()  # an all-positive row (zero point at the bottom)
    plain = rtn_quantize(w, 4, 32, False, gguf_exact=gguf_exact, search=False)
    searched = rtn_quantize(w, 4, 32, False, gguf_exact=gguf_exact)
    err = lambda qw: float(((qw.dequantize() - w) ** 2).sum())
    assert err(searched) < 0.95 * err(plain)
    assert torch.equal(searched.dequantize()[3, :32], torch.zeros(32))
    assert torch.equal(searched.scales.half().float(), searched.scales) and bool((searched.scales > 0).all())
    if gguf_exact:  # Q4_1 stores step x zero point in fp16: still exact after the search
        assert bool(_fp16_exact(searched.scales * searched.zeros.float()).all())
    # Weighted by input energy, the search lowers that weighted error below the unweighted search's.
    importance = torch.rand(128, generator=g) ** 4 * 100
    weighted = rtn_quantize(w, 4, 32, False, importance=importance)
    werr = lambda qw: float((importance * (qw.dequantize() - w) ** 2).sum())
    assert werr(weighted) < werr(searched)


def test_rtn_int8_per_channel_is_nearly_lossless():
    w = torch.randn(32, 64)
    qw = rtn_quantize(w, 8, 64, True)
    assert rel_err(qw.dequantize(), w) < 1e-4


# ---------------------------------------------------------------------------------------
# GPTQ, AWQ, SmoothQuant math


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = correlated_inputs(2048, 128)
    H = accumulate_hessian(None, x[:1024])
    x_test = x[1024:]  # judged on inputs GPTQ did not see
    ref = x_test @ w.T
    rtn = rtn_quantize(w, 4, 32, True).dequantize()
    gptq = gptq_quantize(w, H, 4, 32, True, 0.01, act_order, block_columns=32)
    assert gptq.g_idx is None  # static groups stay contiguous
    e_rtn = rel_err(x_test @ rtn.T, ref)
    e_gptq = rel_err(x_test @ gptq.dequantize().T, ref)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_accumulate_hessian_sums_batches():
    x = torch.randn(3, 5, 8)
    H = accumulate_hessian(accumulate_hessian(None, x[:1]), x[1:])
    assert torch.allclose(H, (x.reshape(-1, 8).T @ x.reshape(-1, 8)).double(), atol=1e-9)


def test_awq_scales_lower_output_error_on_outlier_channels():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = correlated_inputs(1024, 128)
    s, a, err = search_scales(x, [w], bits=4, group_size=32, symmetric=False, n_grid=10)
    ref = x @ w.T
    e_rtn = rel_err(x @ fake_quantize_groups(w, 4, 32, False).T, ref)
    e_awq = rel_err((x / s) @ fake_quantize_groups(w * s, 4, 32, False).T, ref)
    assert a > 0 and e_awq < e_rtn
    assert abs(err - e_awq) < 1e-6 * max(1.0, e_rtn) + 1e-4 * e_awq


def test_awq_module_search_restores_weights_and_beats_identity():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = correlated_inputs(512, 128).reshape(8, 64, 128)
    before = mlp[0].weight.detach().clone()
    ref = mlp(x)
    s, a = search_scales_through(x, mlp, [mlp[0].weight], bits=4, group_size=32, symmetric=False, n_grid=8)
    assert torch.equal(mlp[0].weight, before)

    def err(scale):
        with torch.no_grad():
            mlp[0].weight.copy_(fake_quantize_groups(before * scale, 4, 32, False) / scale)
            e = (mlp(x) - ref).pow(2).mean().item()
            mlp[0].weight.copy_(before)
        return e

    assert a > 0 and err(s) < err(torch.ones(128))


def test_awq_clip_search_never_worse_than_full_range():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    w[:, 0] *= 6  # outliers that clipping can trade off
    x = correlated_inputs(512, 64, seed=1)
    qw = search_clip(x, w, 4, 16, False, n_grid=10, max_shrink=0.5)
    ref = x @ w.T
    full_range = rtn_quantize(w, 4, 16, False, search=False)  # ratio 1, the search's first candidate
    assert rel_err(x @ qw.dequantize().T, ref) <= rel_err(x @ full_range.dequantize().T, ref)


def test_smoothquant_folding_leaves_the_float_model_unchanged():
    model = random_gpt(0)
    ids = torch.randint(0, 320, (2, 16))
    ref = model(ids).logits
    with torch.no_grad():
        for block in model.transformer.h:
            s = smoothing_scales(torch.rand(32) * 10 + 0.1, [block.attn.c_attn.weight], 0.5)
            fold_scales(block.ln_1, [block.attn.c_attn], s)
            fold_scales(block.ln_2, [block.mlp.c_fc], torch.rand(32) + 0.5)
            fold_scales_into_values(block.attn.c_attn, block.attn.c_proj, torch.rand(32) + 0.5)
    assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_smoothing_flattens_activation_outliers():
    act = torch.ones(16)
    act[0] = 100.0
    w = torch.ones(8, 16)
    s = smoothing_scales(act, [w], 0.5)
    assert (act / s).max() / (act / s).min() < act.max() / act.min() / 5


def test_per_token_activation_quantization_error_bound():
    x = torch.randn(4, 7, 32)
    q = quantize_activations_per_token(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((q - x).abs() <= step / 2 + 1e-7)


# ---------------------------------------------------------------------------------------
# quantize_ and artifacts


def calibration(n=8, T=32, seed=0) -> CalibrationData:
    return CalibrationData(torch.randint(0, 320, (n, T), generator=torch.Generator().manual_seed(seed)), "random")


CONFIGS = [
    RTNConfig(bits=8),
    RTNConfig(bits=4, group_size=16, symmetric=False, include_embeddings=True),
    RTNConfig(bits=4, group_size=16, include_embeddings=True, head_bits=8),
    GPTQConfig(bits=4, group_size=16, include_embeddings=True, head_bits=8),
    GPTQConfig(bits=4, group_size=16, include_embeddings=True),
    GPTQConfig(bits=8, group_size=0, act_order=False),
    AWQConfig(bits=4, group_size=16, n_grid=4, include_embeddings=True),
    SmoothQuantConfig(),
    BnbInt8Config(),
    BnbNF4Config(blocksize=32),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.bits}-g{c.group_size}"
                         + (f"-head{c.head_bits}" if c.head_bits else ""))
def test_saved_and_loaded_quantized_models_give_identical_logits(config, byte_tokenizer, tmp_path):
    model = random_gpt(0)
    ids = torch.randint(0, 320, (2, 24))
    ref = model(ids).logits
    report = quantize_(model, config, calibration() if config.calibrated else None)
    out = model(ids).logits
    assert rel_err(out, ref) < (0.05 if config.bits == 4 else 0.01)
    save_quantized(tmp_path / "q", model, byte_tokenizer, config, extra={"calibration": report.calibration})
    loaded = load_quantized(tmp_path / "q")
    # The loaded model learns from its tokenizer that rows past it are padding, and masks them.
    assert torch.equal(loaded.model(ids).logits, mask_padded_vocab(out, byte_tokenizer.vocab_size))
    assert loaded.manifest.stage == "quantize" and loaded.manifest.settings == config.versioned_dict()
    assert loaded.config == config
    if config.integer_weights:
        layers = quantized_linears(loaded.model)
        expected = {f"transformer.h.{i}.{p}" for i in range(2)
                    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
        assert set(layers) - {"lm_head"} == expected
        assert ("lm_head" in layers) == config.include_embeddings
        assert {name: m.qweight.bits for name, m in layers.items()} == {name: config.bits_for(name) for name in layers}
        if config.include_embeddings:
            assert isinstance(loaded.model.transformer.wte, QuantEmbedding)
            assert loaded.model.transformer.wte.qweight is layers["lm_head"].qweight
        for m in layers.values():
            assert torch.equal(m.weight, m.qweight.dequantize())
            assert m.act_bits == (8 if config.method == "smoothquant" and m is not layers.get("lm_head") else None)
        hf = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
        assert hf["quant_method"] == "gptq" and hf["bits"] == config.bits
        assert hf.get("dynamic") == ({"+:^lm_head$": {"bits": 8}} if config.head_bits == 8 else None)
        # Beside quantized embeddings the position table is rounded to float16 and stored so.
        from safetensors.torch import load_file

        stored = load_file(str(tmp_path / "q" / "model.safetensors"))["transformer.wpe.weight"]
        assert stored.dtype == (torch.float16 if config.include_embeddings else torch.float32)
        assert torch.equal(stored.float(), loaded.model.transformer.wpe.weight)


def test_int4_artifact_packs_two_values_per_byte(byte_tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = random_gpt(0)
    config = RTNConfig(bits=4, group_size=16)
    quantize_(model, config)
    save_quantized(tmp_path / "q", model, byte_tokenizer, config)
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    qweight = t["transformer.h.0.mlp.c_fc.qweight"]
    assert qweight.dtype == torch.int32 and qweight.numel() * 4 == 32 * 128 // 2
    assert "transformer.h.0.mlp.c_fc.weight" not in t


def test_gptq_improves_a_trained_like_model_over_rtn():
    """Block-wise GPTQ on the model itself: lower logit error than RTN at the same grid."""
    torch.manual_seed(0)
    base = random_gpt(1, n_embd=64)
    ids = torch.randint(0, 320, (16, 48))
    ref = base(ids).logits
    errs = {}
    for config in (RTNConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32),
                   AWQConfig(bits=4, group_size=32, symmetric=True, n_grid=5)):
        m = random_gpt(1, n_embd=64)
        quantize_(m, config, calibration(16, 48, seed=1))
        errs[config.method] = rel_err(m(ids).logits, ref)
    assert errs["gptq"] < errs["rtn"] and errs["awq"] <= errs["rtn"], errs


# ---------------------------------------------------------------------------------------
# Bad input


def test_head_bits_need_quantized_embeddings_and_a_supported_width():
    with pytest.raises(ConfigError, match="--include-embeddings"):
        RTNConfig(bits=4, head_bits=8)
    with pytest.raises(ConfigError, match="head_bits=7"):
        RTNConfig(bits=4, include_embeddings=True, head_bits=7)
    with pytest.raises(ConfigError, match="head_bits=4"):
        SmoothQuantConfig(include_embeddings=True, head_bits=4)


def test_group_size_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ConfigError, match="does not divide the 32 input columns"):
        quantize_(random_gpt(0), RTNConfig(bits=4, group_size=24))


@pytest.mark.parametrize("make", [lambda: RTNConfig(bits=3), lambda: SmoothQuantConfig(bits=4),
                                  lambda: BnbNF4Config(bits=8), lambda: BnbInt8Config(bits=4),
                                  lambda: GPTQConfig(bits=2)])
def test_unsupported_bits_are_refused(make):
    with pytest.raises(ConfigError, match="bits=.* is not supported"):
        make()


@pytest.mark.parametrize("config", [GPTQConfig(), AWQConfig(), SmoothQuantConfig()], ids=lambda c: c.method)
def test_calibrated_methods_need_calibration_data(config):
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_(random_gpt(0, n_embd=128, n_head=4), config)


def test_layouts_that_cannot_hold_the_weights_are_refused():
    with pytest.raises(ConfigError, match="cannot be saved in the 'gptq' layout"):
        layout_for(BnbNF4Config(), "gptq")
    with pytest.raises(ConfigError, match="cannot be saved in the 'gptq' layout"):
        layout_for(BnbInt8Config(), "gptq")
    with pytest.raises(ConfigError, match="save with --layout gptq"):
        layout_for(GPTQConfig(), "bnb")
    assert layout_for(RTNConfig()) == "gptq" and layout_for(BnbNF4Config()) == "bnb"


def test_quantizing_twice_and_bnb_embeddings_are_refused():
    model = random_gpt(0)
    quantize_(model, RTNConfig())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(model, RTNConfig())
    with pytest.raises(ConfigError, match="cannot hold the tied embedding"):
        quantize_(random_gpt(0), BnbInt8Config(include_embeddings=True))


def test_bnb_4bit_refuses_widths_its_cpu_kernel_cannot_run():
    with pytest.raises(ConfigError, match="divisible by 32"):
        quantize_(random_gpt(0, n_inner=72), BnbNF4Config(blocksize=32))


def test_unfinished_or_float_folders_do_not_load(byte_tokenizer, tmp_path):
    model = random_gpt(0)
    save_model(tmp_path / "float", model, byte_tokenizer, stage="test", settings={})
    with pytest.raises(ArtifactError, match="not a CompactGPT quantized model"):
        load_quantized(tmp_path / "float")
    quantize_(model, RTNConfig())
    save_quantized(tmp_path / "q", model, byte_tokenizer, RTNConfig())
    (tmp_path / "q" / ".incomplete").write_text("")
    with pytest.raises(ArtifactError, match="incomplete"):
        load_quantized(tmp_path / "q")
