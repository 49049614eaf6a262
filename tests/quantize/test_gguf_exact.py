"""--gguf-exact: every int4 grid is chosen so that float16 holds all its numbers, and a GGUF
export (fp16 block scales, and Q4_1's fp16 min = -scale x zero point) holds exactly the
weights the artifact was evaluated with. Off by default, so earlier settings load and
fingerprint as they did."""

from __future__ import annotations

import warnings

import pytest
import torch

from compactgpt.artifacts import read_manifest, save_model
from compactgpt.errors import ConfigError
from quantize import AWQConfig, GPTQConfig, QuantizeConfig, RTNConfig, config_from_dict, load_quantized, quantize_folder
from quantize.config import BnbInt8Config
from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.rtn import fp16_exact_step, grid_params, rtn_quantize

from conftest import random_gpt

warnings.filterwarnings("ignore")


def fp16_exact(t: torch.Tensor, each: bool = False):
    exact = t.half().float() == t
    return exact if each else bool(exact.all())


# ---------------------------------------------------------------------------------------
# The pure function


def test_fp16_exact_step_is_the_smallest_step_whose_product_fp16_holds():
    # Every positive finite fp16 step against every int4 zero point, checked exhaustively.
    steps = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    for z in range(16):
        zero = torch.full_like(steps, float(z))
        valid = steps[fp16_exact(steps * z, each=True)]  # ascending
        at = torch.searchsorted(valid, steps)
        reachable = at < len(valid)  # past it, step x z overflows fp16
        got = fp16_exact_step(steps, zero)
        assert torch.equal(got[reachable], valid[at[reachable]]), z
        assert torch.equal(got[~reachable], steps[~reachable])
        if z in (0, 1, 2, 4, 8):  # powers of two cost nothing
            assert torch.equal(got, steps)


def test_symmetric_grids_and_int8_are_left_as_they_were():
    torch.manual_seed(0)
    lo, hi = -torch.rand(64, 8), torch.rand(64, 8)
    for bits, symmetric in ((4, True), (8, True), (8, False)):
        assert all(torch.equal(a, b) for a, b in zip(grid_params(lo, hi, bits, symmetric),
                                                      grid_params(lo, hi, bits, symmetric, gguf_exact=True)))
    scale, zero = grid_params(lo, hi, 4, False, gguf_exact=True)
    assert fp16_exact(scale) and fp16_exact(scale * zero)
    assert torch.equal(zero, grid_params(lo, hi, 4, False)[1])  # the zero point is the one chosen before


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_fixes_each_group_on_the_grid_it_stores(act_order):
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(256, 64)
    qw = gptq_quantize(w, accumulate_hessian(None, x), 4, 32, symmetric=False, act_order=act_order, gguf_exact=True)
    assert fp16_exact(qw.scales) and fp16_exact(qw.scales * qw.zeros.float())


# ---------------------------------------------------------------------------------------
# Settings: the flag, its checks, old settings


def test_old_settings_load_and_fingerprint_as_before():
    for config in (RTNConfig(bits=4, group_size=32), GPTQConfig(), AWQConfig(include_embeddings=True, head_bits=8)):
        old = {k: v for k, v in config.versioned_dict().items() if k != "gguf_exact"}  # written before the field
        loaded = config_from_dict(old)
        assert loaded == config and loaded.gguf_exact is False
        assert "gguf_exact" not in loaded.fingerprint_dict()  # the fingerprint an earlier run recorded
        on = config_from_dict({**old, "gguf_exact": True})
        assert on.fingerprint_dict()["gguf_exact"] is True and on.fingerprint_dict() != loaded.fingerprint_dict()
        assert config_from_dict(on.versioned_dict()) == on
    # Pinned: a setting that changes what is computed (the grid, config_version 2) is in the
    # fingerprint, so pipeline stages made on the earlier grid run again.
    assert RTNConfig(bits=4, group_size=32).fingerprint_dict() == {
        "method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "include_embeddings": False, "grid": "full"}


def test_settings_saved_before_the_grid_existed_read_as_the_midpoint_grid():
    new = RTNConfig(bits=4, group_size=32)
    version_1 = {k: v for k, v in new.versioned_dict().items() if k != "grid"} | {"config_version": 1}
    assert config_from_dict(version_1).grid == "midpoint"
    assert config_from_dict(new.versioned_dict()).grid == "full"
    assert config_from_dict({k: v for k, v in new.to_dict().items() if k != "grid"}).grid == "full"  # unversioned
    with pytest.raises(ConfigError, match="grid must be one of full, midpoint"):
        RTNConfig(grid="fine")


def test_the_flag_and_its_checks(capsys):
    from compactgpt.app.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--gguf-exact" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="gguf_exact.*bitsandbytes"):
        BnbInt8Config(gguf_exact=True)


# ---------------------------------------------------------------------------------------
# Artifacts and their GGUF exports


@pytest.fixture(scope="module")
def float_model_dir(tmp_path_factory, data_dir, tokenizer):
    folder = tmp_path_factory.mktemp("fp16") / "float"
    save_model(folder, random_gpt(0, n_embd=64), tokenizer, stage="pretrain", settings={}, parent=data_dir)
    return folder


CALIB = dict(calib_samples=8, calib_seq_len=32)
METHOD_CLASSES = {"rtn": (RTNConfig, {}), "gptq": (GPTQConfig, CALIB), "awq": (AWQConfig, {**CALIB, "n_grid": 5})}
# (settings, the GGUF types the export holds)
GRIDS = {
    "int4-sym-g32-head8": (dict(bits=4, group_size=32, symmetric=True, include_embeddings=True, head_bits=8),
                           {"Q4_0", "Q8_0"}),
    "int4-asym-g32": (dict(bits=4, group_size=32, symmetric=False), {"Q4_1"}),
    "int8-sym": (dict(bits=8, group_size=0, symmetric=True), {"Q8_0"}),
}


def quantize_and_export(float_dir, out_dir, method: str, grid: str, gguf_exact: bool) -> dict:
    from export import ExportConfig, export

    cls, extra = METHOD_CLASSES[method]
    config = cls(**GRIDS[grid][0], **extra, gguf_exact=gguf_exact)
    quantized = quantize_folder(QuantizeConfig(model=str(float_dir), out=str(out_dir / "q"), method=config,
                                               progress=False), log=lambda m: None)
    loaded = load_quantized(quantized)
    assert loaded.config.gguf_exact is gguf_exact and loaded.manifest.settings["gguf_exact"] is gguf_exact
    for module in loaded.model.modules():
        qw = getattr(module, "qweight", None)
        if qw is not None and gguf_exact:
            assert fp16_exact(qw.scales) and fp16_exact(qw.scales * qw.zeros.float())
    out = export(ExportConfig(model=str(quantized), out=str(out_dir / "gguf"), format="gguf"), log=lambda m: None)
    return read_manifest(out).metrics["max_weight_change"]


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("method", list(METHOD_CLASSES))
def test_gguf_export_holds_exactly_the_evaluated_weights(float_model_dir, tmp_path, method, grid):
    pytest.importorskip("gguf")
    change = quantize_and_export(float_model_dir, tmp_path, method, grid, gguf_exact=True)
    quantized_types = {t: v for t, v in change.items() if t != "F32"}
    assert set(quantized_types) == GRIDS[grid][1]
    assert all(v == 0.0 for v in quantized_types.values()), change


@pytest.mark.parametrize("method", list(METHOD_CLASSES))
def test_without_the_setting_q4_1_mins_move_the_weights(float_model_dir, tmp_path, method):
    pytest.importorskip("gguf")
    # Asymmetric int4 without the setting: fp16 rounds some min, so the export moves weights.
    assert quantize_and_export(float_model_dir, tmp_path / "asym", method, "int4-asym-g32", False)["Q4_1"] > 0.0
    # Symmetric grids are fp16-exact with or without it (the scales are always rounded up to fp16).
    change = quantize_and_export(float_model_dir, tmp_path / "sym", method, "int4-sym-g32-head8", False)
    assert change["Q4_0"] == 0.0 and change["Q8_0"] == 0.0


# ---------------------------------------------------------------------------------------
# What it costs


def test_weight_error_stays_within_one_percent():
    torch.manual_seed(0)
    w = torch.randn(768, 768) * 0.02 + 0.003 * torch.randn(768, 1)  # rows off centre: zero points of every value
    for group_size in (32, 128):
        before = (rtn_quantize(w, 4, group_size, False).dequantize() - w).pow(2).mean()
        after = (rtn_quantize(w, 4, group_size, False, gguf_exact=True).dequantize() - w).pow(2).mean()
        assert before <= after <= 1.01 * before
    same = rtn_quantize(w, 4, 32, True, gguf_exact=True)
    assert torch.equal(same.scales, rtn_quantize(w, 4, 32, True).scales)
