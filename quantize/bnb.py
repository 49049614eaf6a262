"""bitsandbytes LLM.int8 (`Linear8bitLt`) and NF4/FP4 (`Linear4bit`) layers.

bitsandbytes 0.45+ runs both on CPU as well as CUDA. Its layers keep their own storage
(int8 rows with per-row absmax `SCB`; 4-bit codes with per-block absmax and a code map), so
they are saved in bitsandbytes' own serialization (the tensors of the layer's state dict,
which transformers also reads) and rebuilt from it here. bitsandbytes itself is imported on
first use. The handlers at the end, registered for BnbInt8Config and BnbNF4Config, swap a
GPT's projections for these layers; the "bnb" layouts registered beside them save and load them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from compactgpt.artifacts import FLOAT_DTYPES, check_tensor
from compactgpt.errors import ArtifactError, ConfigError

from .config import BnbInt8Config, BnbNF4Config, QuantConfig
from .handlers import SavedLayers, each_projection, register_handler, register_layout
from .modules import set_module


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes

    return bitsandbytes


def to_int8_linear(lin: nn.Linear, threshold: float) -> nn.Module:
    """An LLM.int8 layer with lin's weights, quantized row-wise on lin's device (bitsandbytes'
    CUDA kernels when it is a GPU)."""
    bnb = _bnb()
    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    # Built on the CPU: Int8Params quantizes on its move from the CPU to a device; float
    # weights already on a GPU would be moved as they are, unquantized.
    m.weight = bnb.nn.Int8Params(lin.weight.detach().float().cpu().clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().float().cpu().clone(), requires_grad=False)
    return m.to(lin.weight.device)


def to_4bit_linear(lin: nn.Linear, quant_type: str, blocksize: int, double_quant: bool) -> nn.Module:
    """An NF4/FP4 layer with lin's weights; moving it to lin's device quantizes them there
    (bitsandbytes' CUDA kernels when it is a GPU)."""
    bnb = _bnb()
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    # Built on the CPU like the LLM.int8 layer above, so the one move below does the quantizing.
    m.weight = bnb.nn.Params4bit(lin.weight.detach().float().cpu().clone(), requires_grad=False,
                                 quant_type=quant_type, blocksize=blocksize, compress_statistics=double_quant)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().float().cpu().clone(), requires_grad=False)
    # A Linear4bit quantizes on its first move; before it, forward fails.
    return m.to(lin.weight.device)


def is_bnb_module(m: nn.Module) -> bool:
    bnb = _bnb()
    return isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def bnb_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that define a bitsandbytes layer (its state dict, minus bookkeeping)."""
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items() if k != "weight_format"}


def check_bnb_header(path, name: str, entries: dict[str, tuple[str, tuple[int, ...]]], eightbit: bool,
                     in_features: int, out_features: int) -> None:
    """Check one bitsandbytes layer's tensors from a safetensors header (name within the layer
    -> (dtype, shape)) before they are read: LLM.int8 keeps int8 rows and float32 row
    scales (SCB); 4-bit layers keep two codes per byte in a (n, 1) uint8 tensor and float
    statistics (absmax itself uint8 when double-quantized). Raises ArtifactError naming the
    tensor. Statistics bitsandbytes may add in later versions are left to it."""
    fix = "the file is damaged or was not written for this config; rerun quantize"
    if eightbit:
        expected = {"weight": (("I8",), (out_features, in_features)), "SCB": (("F32", "F16"), (out_features,))}
    else:
        codes = (in_features * out_features + 1) // 2
        expected = {"weight": (("U8",), (codes, 1)), "weight.absmax": (("F32", "U8"), None),
                    "weight.quant_map": (FLOAT_DTYPES, None), "weight.nested_absmax": (FLOAT_DTYPES, None),
                    "weight.nested_quant_map": (FLOAT_DTYPES, None)}
    expected["bias"] = (FLOAT_DTYPES, (out_features,))
    for key, found in entries.items():
        if key in expected:
            dtypes, shape = expected[key]
            check_tensor(path, f"{name}.{key}", found, dtypes, shape, fix)
        elif key.startswith("weight.quant_state."):
            check_tensor(path, f"{name}.{key}", found, ("U8",), None, fix)  # bitsandbytes' packed JSON


def int8_from_tensors(t: dict[str, torch.Tensor], threshold: float, name: str) -> nn.Module:
    bnb = _bnb()
    if "weight" not in t or "SCB" not in t:
        raise ArtifactError(f"{name}: the LLM.int8 layer lacks weight or SCB; the file is damaged")
    out_f, in_f = t["weight"].shape
    m = bnb.nn.Linear8bitLt(in_f, out_f, bias="bias" in t, has_fp16_weights=False, threshold=threshold)
    p = bnb.nn.Int8Params(t["weight"].clone(), requires_grad=False, has_fp16_weights=False)
    p.CB = p.data
    p.SCB = t["SCB"].clone()
    m.weight = p
    if "bias" in t:
        m.bias = nn.Parameter(t["bias"].clone(), requires_grad=False)
    return m


def fourbit_from_tensors(t: dict[str, torch.Tensor], in_f: int, out_f: int, name: str) -> nn.Module:
    bnb = _bnb()
    if "weight" not in t:
        raise ArtifactError(f"{name}: the 4-bit layer lacks its weight; the file is damaged")
    stats = {k[len("weight."):]: v for k, v in t.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=t["weight"], quantized_stats=stats, requires_grad=False, device="cpu")
    m = bnb.nn.Linear4bit(in_f, out_f, bias="bias" in t, compute_dtype=torch.float32,
                          quant_type=p.quant_state.quant_type)
    m.weight = p
    if "bias" in t:
        m.bias = nn.Parameter(t["bias"].clone(), requires_grad=False)
    return m


# ---------------------------------------------------------------------------------------
# Handlers


def _no_bnb_embeddings(config: QuantConfig) -> None:
    if config.include_embeddings:
        raise ConfigError(
            f"{config.method}: bitsandbytes layers cannot hold the tied embedding / LM head; drop "
            "--include-embeddings, or use rtn/gptq/awq to quantize the embeddings"
        )


@register_handler(BnbInt8Config)
@torch.no_grad()
def _bnb_int8(model, config: BnbInt8Config, calibration, progress: bool) -> None:
    _no_bnb_embeddings(config)
    for name, lin in each_projection(model, "bnb-int8", progress):
        set_module(model, name, to_int8_linear(lin, config.threshold))


@register_handler(BnbNF4Config)
@torch.no_grad()
def _bnb_nf4(model, config: BnbNF4Config, calibration, progress: bool) -> None:
    _no_bnb_embeddings(config)
    for name, lin in each_projection(model, "bnb-4bit", progress):
        if lin.out_features % 32:
            raise ConfigError(
                f"bnb-nf4: bitsandbytes' CPU 4-bit kernel needs output widths divisible by 32, but {name} "
                f"has {lin.out_features} outputs; use rtn/gptq/awq (bits 4) for this model"
            )
        set_module(model, name, to_4bit_linear(lin, config.quant_type, config.blocksize, config.double_quant))


# ---------------------------------------------------------------------------------------
# Layouts: bitsandbytes' own serialization (transformers' `quant_method: bitsandbytes`)


class BnbLayout:
    """The layers' state-dict tensors; the int8 and 4-bit layouts below differ in the
    config.json entry and in how a layer is checked and rebuilt."""

    name = "bnb"
    description = "bitsandbytes' own serialization (bnb-int8, bnb-nf4)"
    eightbit = False

    def save(self, model) -> SavedLayers:
        """Every bitsandbytes layer's tensors."""
        layers = {n: m for n, m in model.named_modules() if is_bnb_module(m)}
        if not layers:
            raise ConfigError("the model has no bitsandbytes layers to save; run quantize_ first")
        tensors = {f"{name}.{key}": t for name, m in layers.items() for key, t in bnb_tensors(m).items()}
        return SavedLayers(tensors, set(layers), None)

    def layer_names(self, header: dict) -> set[str]:
        """Layers with LLM.int8's row scales (SCB) or a 4-bit absmax."""
        return ({k.rsplit(".", 1)[0] for k in header if k.endswith(".SCB")} |
                {k[: -len(".weight.absmax")] for k in header if k.endswith(".weight.absmax")})

    def check_layer(self, path: Path, name: str, entries: dict, config: QuantConfig, linear: nn.Linear) -> None:
        """bitsandbytes' tensors of the layer's kind and shape (see check_bnb_header)."""
        check_bnb_header(path, name, entries, self.eightbit, linear.in_features, linear.out_features)

    def refusal(self, config: QuantConfig, layout: str) -> str:
        """bitsandbytes' codes are not affine integer groups."""
        return (f"{config.method} weights cannot be saved in the {layout!r} layout: bitsandbytes keeps NF4/FP4 codes "
                "or LLM.int8 rows with outlier handling, not affine integer groups; save with --layout bnb, or "
                "quantize with rtn/gptq/awq for the gptq layout")


class BnbInt8Layout(BnbLayout):
    """LLM.int8 layers (Linear8bitLt)."""

    eightbit = True

    def quantization_config(self, config: BnbInt8Config, act_bits: int | None) -> dict:
        """transformers' `load_in_8bit` entry."""
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": config.threshold}

    def load_layer(self, model, name: str, tensors: dict[str, torch.Tensor], config: BnbInt8Config,
                   act_bits: int | None, device) -> None:
        """A Linear8bitLt with the config's outlier threshold."""
        set_module(model, name, int8_from_tensors(tensors, config.threshold, name))


class BnbNF4Layout(BnbLayout):
    """NF4 / FP4 layers (Linear4bit)."""

    def quantization_config(self, config: BnbNF4Config, act_bits: int | None) -> dict:
        """transformers' `load_in_4bit` entry."""
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": config.quant_type,
                "bnb_4bit_use_double_quant": config.double_quant, "bnb_4bit_compute_dtype": "float32",
                "bnb_4bit_blocksize": config.blocksize}

    def load_layer(self, model, name: str, tensors: dict[str, torch.Tensor], config: BnbNF4Config,
                   act_bits: int | None, device) -> None:
        """A Linear4bit of the float layer's shape."""
        lin = model.get_submodule(name)
        set_module(model, name, fourbit_from_tensors(tensors, lin.in_features, lin.out_features, name))


register_layout(BnbInt8Config, BnbInt8Layout())
register_layout(BnbNF4Config, BnbNF4Layout())
