"""llama.cpp's grids as quantize formats: Q6_K and Q3_K (an fp16 d per 256 weights times an
integer sc per 16), Q5_0, Q4_K; their block structure kept exactly, searched scales that beat
the plain max rule, the same weights through PyTorch, the GPTQ checkpoint, ONNX Runtime and
the GGUF file; and the mix that `--bits-per-weight` chooses among them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compactgpt.errors import ConfigError
from quantize import load_quantized, quantize_, save_quantized
from quantize.calibrate import CalibrationData
from quantize.config import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
from quantize.format import quantize_codes
from quantize.kquant import (Q3_K, Q6_K, signed_k_decompose, signed_k_grid, signed_k_kind, signed_k_quantize,
                             sub_block_steps)
from tests.conftest import random_gpt


def weight(seed=0, out_f=48, in_f=512):
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed rows, as trained weights are: the extreme of a sub-block is far from the rest.
    return torch.randn(out_f, in_f, generator=g) * 0.02 * (1 + torch.rand(out_f, 1, generator=g)) + \
        torch.randn(out_f, in_f, generator=g).pow(3) * 0.005


def test_scales_are_an_fp16_d_per_super_block_times_int8():
    w = weight()
    qw = signed_k_quantize(w, Q6_K)
    assert signed_k_kind(qw) is Q6_K and qw.bits == 8 and qw.group_size == Q6_K.group
    assert int(qw.codes.max()) <= 63 and bool((qw.zeros == 32).all())
    d, sc = signed_k_decompose(qw.scales, Q6_K)
    assert d.dtype == torch.float16 and sc.dtype == torch.int8 and d.shape == (48, 2)
    assert torch.equal(d.float().repeat_interleave(16, dim=1) * sc.float(), qw.scales)
    assert int(sc.min()) == -128  # each super-block's largest step lands on -128, as llama.cpp puts it
    # Scales made on another grid have no such split.
    assert signed_k_decompose(qw.scales * (1 + 1e-3 * torch.rand(qw.scales.shape)), Q6_K) is None


def test_six_bits_sit_between_four_and_eight():
    from quantize.rtn import rtn_quantize

    w = weight()
    errors = {bits: float((rtn_quantize(w, bits, 32, True).dequantize() - w).pow(2).mean()) for bits in (4, 6, 8)}
    assert errors[8] < errors[6] < errors[4] / 10


def test_the_searched_step_beats_the_plain_extreme_rule():
    x = weight(1).reshape(-1, Q6_K.group)
    a = x * x
    extreme = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))
    plain = extreme / -32

    def weighted_error(step):
        q = quantize_codes(x, step, 32, 6) - 32
        return float((a * (x - q * step) ** 2).sum())

    assert weighted_error(sub_block_steps(x, a, 32)[:, None]) < 0.97 * weighted_error(plain)


def test_importance_weights_the_error_it_names():
    w = weight(2)
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(w.shape[1], generator=g) ** 4 * 100  # a few columns carry most input energy

    def weighted_error(scales):
        codes = quantize_codes(w.reshape(w.shape[0], -1, Q6_K.group), scales[..., None], 32, 6).reshape(w.shape)
        deq = (codes - 32) * scales.repeat_interleave(Q6_K.group, dim=1)
        return float((importance * (w - deq) ** 2).sum())

    assert weighted_error(signed_k_grid(w, Q6_K, importance)[0]) < weighted_error(signed_k_grid(w, Q6_K)[0])


def test_an_all_zero_super_block_stays_zero():
    w = weight(0, 4, 512)
    w[1, :256] = 0
    qw = signed_k_quantize(w, Q6_K)
    assert torch.equal(qw.dequantize()[1, :256], torch.zeros(256))
    assert signed_k_decompose(qw.scales, Q6_K) is not None


def calibration():
    return CalibrationData(torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0)), "random")


@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32, include_embeddings=True, head_bits=6),
    GPTQConfig(bits=4, group_size=32, act_order=False, include_embeddings=True, head_bits=6, calib_samples=8),
    AWQConfig(bits=4, group_size=32, include_embeddings=True, head_bits=6, calib_samples=8, n_grid=2),
], ids=["rtn", "gptq", "awq"])
def test_a_six_bit_head_loads_back_and_runs_the_same_everywhere(tmp_path, tokenizer, config):
    from export.gguf import block_type, gguf_dequantized, read_gguf_weights, write_gguf

    model = random_gpt(0, n_embd=256, n_head=4)
    quantize_(model, config, calibration() if config.calibrated else None)
    head = model.lm_head.qweight
    assert signed_k_kind(head) is Q6_K and block_type(head, "lm_head") == "Q6_K"
    assert model.transformer.wte.qweight is head
    save_quantized(tmp_path / "q", model, tokenizer, config)
    loaded = load_quantized(tmp_path / "q").model
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    n = tokenizer.vocab_size  # the saved model masks the vocabulary's padding rows
    assert torch.equal(loaded(ids).logits[..., :n], model(ids).logits[..., :n])
    # GGUF: the head is a Q6_K tensor that decodes to exactly the artifact's weights.
    written = {t.name: t for t in write_gguf(tmp_path / "m.gguf", loaded, tokenizer)}
    assert written["token_embd.weight"].ggml_type == "Q6_K"
    decoded = read_gguf_weights(tmp_path / "m.gguf")["token_embd.weight"]
    assert np.array_equal(decoded, loaded.lm_head.weight[:n].numpy())
    assert np.array_equal(decoded, gguf_dequantized(head)[:n].numpy())


def test_gptq_solves_on_the_q6_k_grid_it_stores():
    """GPTQ's head: the grid is fixed from the original weights (input energy as importance),
    and the solve lowers the output error below rounding to that same grid."""
    from quantize.gptq import accumulate_hessian, gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = weight(4, 32, 256)
    x = torch.randn(512, 256, generator=g) * (1 + 4 * torch.rand(256, generator=g))
    H = accumulate_hessian(None, x)
    solved = gptq_quantize(w, H, 6, 0, act_order=False)
    assert signed_k_kind(solved) is Q6_K
    grid, _ = signed_k_grid(w, Q6_K, torch.diag(H).float())
    assert torch.equal(solved.scales, grid)
    rounded = quantize_codes(w.reshape(32, -1, 16), grid[..., None], 32, 6).reshape(w.shape)
    rounded = (rounded - 32) * grid.repeat_interleave(16, dim=1)

    def output_error(deq):
        return float((x @ (w - deq).T).pow(2).mean())

    assert output_error(solved.dequantize()) < 0.9 * output_error(rounded)


def test_six_bits_are_refused_where_they_cannot_be_made():
    with pytest.raises(ConfigError, match="multiple of 256"):
        quantize_(random_gpt(0, n_embd=64), RTNConfig(bits=4, group_size=32, include_embeddings=True, head_bits=6))
    with pytest.raises(ConfigError, match="head_bits=6 is not supported"):
        SmoothQuantConfig(include_embeddings=True, head_bits=6)
    with pytest.raises(ConfigError, match="head_bits=7 is not supported; use 0 .* or 3 or 4 or 5 or 6 or 8"):
        RTNConfig(bits=4, include_embeddings=True, head_bits=7)


def test_onnx_runs_the_six_bit_head_as_pytorch_does(tmp_path, tokenizer):
    import onnxruntime as ort

    from export.graph import BuildOptions, build_decoder, collect_projections
    from export.spec import DecoderSpec
    from export.validate import validate

    model = random_gpt(0, n_embd=256, n_head=4)
    quantize_(model, RTNConfig(bits=4, group_size=32, include_embeddings=True, head_bits=6))
    proto = build_decoder(model, collect_projections(model), BuildOptions(accuracy_level=0))
    heads = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.name == "lm_head"]
    assert [a.i for a in heads[0].attribute if a.name == "bits"] == [8]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)["max_logits_diff"] < 1e-4


# ---------------------------------------------------------------------------------------
# Q3_K and Q5_0 (layers the mix gives 3 or 5 bits; --head-bits 5)


def test_q3_k_scales_are_an_fp16_d_per_super_block_times_six_bits():
    w = weight(6)
    qw = signed_k_quantize(w, Q3_K)
    assert signed_k_kind(qw) is Q3_K and qw.bits == 4 and qw.group_size == 16
    assert int(qw.codes.max()) <= 7 and bool((qw.zeros == 4).all())
    d, sc = signed_k_decompose(qw.scales, Q3_K)
    assert d.dtype == torch.float16 and d.shape == (48, 2) and -32 <= int(sc.min()) and int(sc.max()) <= 31
    assert int(sc.min()) == -32  # each super-block's largest step lands on -32, as llama.cpp puts it
    assert torch.equal(d.float().repeat_interleave(16, dim=1) * sc.float(), qw.scales)
    assert Q3_K.bits_per_weight == 3.4375 and Q6_K.bits_per_weight == 6.5625


def test_three_and_five_bits_sit_around_four():
    from quantize.rtn import rtn_quantize

    w = weight()
    errors = {bits: float((rtn_quantize(w, bits, 32, True).dequantize() - w).pow(2).mean()) for bits in (3, 4, 5, 6)}
    assert errors[6] < errors[5] < errors[4] < errors[3]
    five = rtn_quantize(w, 5, 32, True)  # Q5_0: symmetric codes 0..31 around 16, stored as 8-bit codes
    assert five.bits == 8 and bool((five.zeros == 16).all()) and int(five.codes.max()) <= 31
    assert torch.equal(five.scales.half().float(), five.scales)


@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32, include_embeddings=True, head_bits=5,
              module_bits={"transformer.h.0.mlp.c_fc": 3, "transformer.h.1.mlp.c_proj": 3,
                           "transformer.h.1.attn.c_attn": 5}),
    GPTQConfig(bits=4, group_size=32, act_order=False, include_embeddings=True, calib_samples=8,
               module_bits={"transformer.h.0.mlp.c_fc": 3, "transformer.h.1.mlp.c_proj": 3,
                            "transformer.h.1.attn.c_attn": 5, "lm_head": 5}),
    AWQConfig(bits=4, group_size=32, include_embeddings=True, head_bits=5, calib_samples=8, n_grid=2),
], ids=["rtn", "gptq", "awq"])
def test_three_and_five_bit_layers_load_back_and_run_the_same_everywhere(tmp_path, tokenizer, config):
    import onnxruntime as ort

    from export.gguf import read_gguf_weights, write_gguf
    from export.graph import BuildOptions, build_decoder, collect_projections
    from export.spec import DecoderSpec
    from export.validate import validate

    model = random_gpt(0, n_embd=256, n_head=4)
    quantize_(model, config, calibration() if config.calibrated else None)
    save_quantized(tmp_path / "q", model, tokenizer, config)
    loaded = load_quantized(tmp_path / "q").model
    n = tokenizer.vocab_size
    # config.json says, per module, the width the codes are stored at (GPTQModel's overrides).
    dynamic = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dynamic["+:^lm_head$"] == {"bits": 8, **({"sym": True} if not config.symmetric else {})}
    if config.module_bits:
        assert dynamic[r"+:^transformer\.h\.0\.mlp\.c_fc$"] == {"bits": 4, "group_size": 16}
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).logits[..., :n], model(ids).logits[..., :n])
    # GGUF: each layer in its llama.cpp type, decoding to exactly the artifact's weights.
    written = {t.name: t for t in write_gguf(tmp_path / "m.gguf", loaded, tokenizer)}
    decoded = read_gguf_weights(tmp_path / "m.gguf")
    assert written["token_embd.weight"].ggml_type == "Q5_0"
    assert np.array_equal(decoded["token_embd.weight"], loaded.lm_head.weight[:n].numpy())
    if config.module_bits:
        assert written["blk.0.ffn_up.weight"].ggml_type == written["blk.1.ffn_down.weight"].ggml_type == "Q3_K"
        assert written["blk.1.attn_qkv.weight"].ggml_type == "Q5_0"
        assert written["blk.0.attn_qkv.weight"].ggml_type == "Q4_0"
        for gguf_name, module in (("blk.0.ffn_up", loaded.transformer.h[0].mlp.c_fc),
                                  ("blk.1.ffn_down", loaded.transformer.h[1].mlp.c_proj),
                                  ("blk.1.attn_qkv", loaded.transformer.h[1].attn.c_attn)):
            assert np.array_equal(decoded[f"{gguf_name}.weight"], module.weight.numpy())
    # ONNX Runtime: Q3_K as 4-bit blocks of 16 around 4, Q5_0 as 8-bit blocks around 16.
    proto = build_decoder(model, collect_projections(model), BuildOptions(accuracy_level=0))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)["max_logits_diff"] < 1e-4


def test_three_and_five_bits_are_refused_where_they_cannot_be_made():
    with pytest.raises(ConfigError, match="Q3_K uses super-blocks of 256"):
        quantize_(random_gpt(0, n_embd=64), RTNConfig(bits=4, group_size=32,
                                                      module_bits={"transformer.h.0.mlp.c_fc": 3}))
    with pytest.raises(ConfigError, match="head_bits=5 is not supported"):
        SmoothQuantConfig(include_embeddings=True, head_bits=5)


# ---------------------------------------------------------------------------------------
# Q4_K (--grid k)


def test_q4_k_grid_is_six_bit_multiples_of_fp16_numbers():
    from quantize.kquant import q4_k_decompose, q4_k_quantize
    from quantize.rtn import rtn_quantize

    w = weight(5, 64, 512)
    qk = q4_k_quantize(w)
    assert qk.bits == 4 and qk.group_size == 32 and qk.offsets is not None and bool((qk.zeros == 0).all())
    d, sc, dmin, m = q4_k_decompose(qk)
    assert d.dtype == dmin.dtype == torch.float16 and int(sc.max()) <= 63 and int(m.max()) <= 63
    assert int(sc.min()) >= 1  # a step is never 0: MatMulNBits takes the offset as offset / step
    assert torch.equal(d.float().repeat_interleave(8, dim=1) * sc.float(), qk.scales)
    assert torch.equal(-(dmin.float().repeat_interleave(8, dim=1) * m.float()), qk.offsets)
    err = lambda q: float((q.dequantize() - w).pow(2).mean())
    # A searched step and minimum per 32 weights beat a symmetric grid with the same group.
    assert err(qk) < 0.8 * err(rtn_quantize(w, 4, 32, True))


def k_configs():
    return [RTNConfig(bits=4, group_size=32, grid="k", include_embeddings=True, head_bits=6),
            GPTQConfig(bits=4, group_size=32, grid="k", act_order=False, include_embeddings=True, head_bits=6,
                       calib_samples=8)]


@pytest.mark.parametrize("config", k_configs(), ids=["rtn", "gptq"])
def test_the_k_grid_loads_back_and_runs_the_same_everywhere(tmp_path, tokenizer, config):
    import onnxruntime as ort

    from export.gguf import read_gguf_weights, write_gguf
    from export.graph import BuildOptions, build_decoder, collect_projections
    from export.spec import DecoderSpec
    from export.validate import validate

    model = random_gpt(0, n_embd=256, n_head=4)
    quantize_(model, config, calibration() if config.calibrated else None)
    layer = model.transformer.h[1].mlp.c_proj.qweight  # 1024 columns: four super-blocks
    assert layer.offsets is not None and layer.group_size == 32
    save_quantized(tmp_path / "q", model, tokenizer, config)
    loaded = load_quantized(tmp_path / "q").model
    assert torch.equal(loaded.transformer.h[1].mlp.c_proj.weight, model.transformer.h[1].mlp.c_proj.weight)
    written = {t.name: t for t in write_gguf(tmp_path / "m.gguf", loaded, tokenizer)}
    assert written["blk.1.ffn_down.weight"].ggml_type == "Q4_K" and written["token_embd.weight"].ggml_type == "Q6_K"
    decoded = read_gguf_weights(tmp_path / "m.gguf")
    assert np.array_equal(decoded["blk.1.ffn_down.weight"], model.transformer.h[1].mlp.c_proj.weight.numpy())
    assert np.array_equal(decoded["blk.0.attn_qkv.weight"], model.transformer.h[0].attn.c_attn.weight.numpy())
    # ONNX Runtime: the offsets as float zero points, equal to float32 rounding.
    proto = build_decoder(model, collect_projections(model), BuildOptions(accuracy_level=0))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert validate(model, session, DecoderSpec.from_config(model.config), atol=1e-4)["max_logits_diff"] < 1e-4


def test_gptq_solves_on_the_q4_k_grid_it_stores():
    from quantize.gptq import accumulate_hessian, gptq_quantize
    from quantize.kquant import q4_k_grid

    g = torch.Generator().manual_seed(0)
    w = weight(6, 32, 256)
    x = torch.randn(512, 256, generator=g) * (1 + 4 * torch.rand(256, generator=g))
    H = accumulate_hessian(None, x)
    solved = gptq_quantize(w, H, 4, 32, act_order=False, grid="k")
    steps, offsets = q4_k_grid(w, torch.diag(H).float())
    assert torch.equal(solved.scales, steps) and torch.equal(solved.offsets, offsets)
    rounded = quantize_codes(w.reshape(32, -1, 32) - offsets[..., None], steps[..., None], 0, 4)
    rounded = (rounded * steps[..., None] + offsets[..., None]).reshape(w.shape)
    output_error = lambda deq: float((x @ (w - deq).T).pow(2).mean())
    assert output_error(solved.dequantize()) < 0.9 * output_error(rounded)


def test_the_k_grid_is_refused_where_it_cannot_be_made():
    with pytest.raises(ConfigError, match="4 bits in groups of 32"):
        RTNConfig(bits=8, grid="k")
    with pytest.raises(ConfigError, match="4 bits in groups of 32"):
        RTNConfig(bits=4, group_size=64, grid="k")
    with pytest.raises(ConfigError, match="made by rtn and gptq"):
        AWQConfig(grid="k", group_size=32, symmetric=True)
    with pytest.raises(ConfigError, match="multiple of 256"):
        quantize_(random_gpt(0, n_embd=64), RTNConfig(bits=4, group_size=32, grid="k"))
    from export.gguf import block_type
    from quantize.kquant import q4_k_quantize

    qw = q4_k_quantize(weight(0, 8, 256))
    qw.offsets = qw.offsets * (1 + 1e-3)  # offsets off the grid
    with pytest.raises(ConfigError, match="not llama.cpp's Q4_K grid"):
        block_type(qw, "blk.0.ffn_up.weight")


# ---------------------------------------------------------------------------------------
# Mixed precision (--bits-per-weight)


def test_the_budget_goes_where_it_buys_the_most_kl():
    """STORED_BITS: Q4 4.5, Q6_K 6.5625, Q8_0 8.5 bits per weight."""
    from quantize.mix import STORED_BITS, choose_bits

    kl = {"a": {4: 10.0, 6: 1.0, 8: 0.5}, "b": {4: 2.0, 6: 1.5, 8: 1.4}, "c": {4: 5.0, 8: 0.0}}
    sizes = {"a": 100, "b": 100, "c": 100}
    assert choose_bits(kl, sizes, 4.5) == {"a": 4, "b": 4, "c": 4}
    # 2.0625 extra bits per weight on a third of the weights: a's upgrade saves the most per bit.
    assert choose_bits(kl, sizes, 4.5 + 2.0625 / 3) == {"a": 6, "b": 4, "c": 4}
    chosen = choose_bits(kl, sizes, 6.6)  # then c's 8 bits (0.0125 nats per bit) before a's (0.0026)
    spent = sum(STORED_BITS[b] * sizes[n] for n, b in chosen.items()) / 300
    assert spent <= 6.6 and chosen == {"a": 6, "b": 4, "c": 8}
    assert choose_bits(kl, sizes, 8.5) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(ConfigError, match="below the smallest mix"):
        choose_bits(kl, sizes, 4.0)


def test_the_mix_is_the_best_that_fits():
    """The dynamic program against every mix of small random problems: the least summed KL
    within the budget, found exactly."""
    import itertools

    from quantize.mix import STORED_BITS, choose_bits

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        names = [f"m{i}" for i in range(4)]
        sizes = {n: 256 * int(torch.randint(1, 9, (1,), generator=g)) for n in names}
        kl = {}
        for n in names:
            options = [3, 4, 5, 6, 8] if trial % 2 else [4, 6, 8]
            errors = sorted(torch.rand(len(options), generator=g).tolist(), reverse=True)
            kl[n] = dict(zip(options, errors))
        total = sum(sizes.values())
        budget = float(min(STORED_BITS[min(kl[n])] for n in names) + 4 * torch.rand(1, generator=g))
        feasible = [dict(zip(names, combo)) for combo in itertools.product(*(sorted(kl[n]) for n in names))
                    if sum(STORED_BITS[b] * sizes[n] for n, b in zip(names, combo)) <= budget * total]
        if not feasible:
            with pytest.raises(ConfigError):
                choose_bits(kl, sizes, budget)
            continue
        best = min(sum(kl[n][mix[n]] for n in names) for mix in feasible)
        chosen = choose_bits(kl, sizes, budget)
        assert sum(STORED_BITS[chosen[n]] * sizes[n] for n in names) <= budget * total
        assert sum(kl[n][chosen[n]] for n in names) == pytest.approx(best)


def test_the_mix_takes_bits_from_several_blocks_for_one_large_matrix():
    """What a one-upgrade-at-a-time rule cannot reach: the head at 6 bits paid for by blocks
    at 3 bits, below the budget that an all-4-bit start would need."""
    from quantize.mix import choose_bits

    kl = {"head": {3: 30.0, 4: 6.0, 5: 1.8, 6: 0.3}, **{f"b{i}": {3: 0.1, 4: 0.03, 5: 0.01} for i in range(3)}}
    sizes = {"head": 300, "b0": 256, "b1": 256, "b2": 256}
    chosen = choose_bits(kl, sizes, 4.75)  # every matrix at 4.5 bits and the head at 6 would need 5.08
    assert chosen["head"] == 6 and sorted(chosen[f"b{i}"] for i in range(3)) == [3, 3, 4]


def test_bits_per_weight_measures_chooses_records_and_loads(tmp_path, tokenizer):
    from quantize.mix import STORED_BITS

    model = random_gpt(0, n_embd=256, n_head=4)
    config = GPTQConfig(bits=4, group_size=32, grid="k", act_order=False, include_embeddings=True, head_bits=6,
                        calib_samples=8, bits_per_weight=5.5)
    report = quantize_(model, config, calibration())
    chosen = report.config.module_bits
    assert set(chosen) == {f"transformer.h.{i}.{p}" for i in range(2)
                           for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {"lm_head"}
    sizes = {name: (model.lm_head if name == "lm_head" else model.get_submodule(name)).weight.numel() for name in chosen}
    spent = sum(STORED_BITS[chosen[n]] * sizes[n] for n in chosen) / sum(sizes.values())
    assert 4.5 < spent <= 5.5 and len(set(chosen.values())) > 1
    for name, bits in chosen.items():  # every layer quantized at its chosen bits
        qw = (model.lm_head if name == "lm_head" else model.get_submodule(name)).qweight
        assert (qw.offsets is not None) == (bits == 4 and name != "lm_head")
        assert (signed_k_kind(qw) is Q6_K) == (bits == 6) and (signed_k_kind(qw) is Q3_K) == (bits == 3)
        assert (qw.bits == 8 and bool((qw.zeros == 16).all())) == (bits == 5)
    save_quantized(tmp_path / "q", model, tokenizer, report.config)
    loaded = load_quantized(tmp_path / "q")
    assert loaded.config.module_bits == chosen
    for name in chosen:
        get = (lambda m: m.lm_head) if name == "lm_head" else (lambda m, n=name: m.get_submodule(n))
        assert torch.equal(get(loaded.model).weight, get(model).weight)
    with pytest.raises(ConfigError, match="bits_per_weight must be"):
        GPTQConfig(bits_per_weight=3.0, group_size=32)
    with pytest.raises(ConfigError, match="--bits 4 --group-size 32"):
        GPTQConfig(bits_per_weight=5.0, group_size=128)
