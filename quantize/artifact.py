"""Quantized artifact folders: a GPT-2 folder whose projections hold packed integer weights.

    config.json          GPT-2 config + `quantization_config`
    model.safetensors    float tensors (LayerNorms, positions, biases, the embedding unless
                         quantized) in GPT-2 names and layouts, plus per quantized layer either
                         the GPTQ tensors (`qweight`, `qzeros`, `scales`, `g_idx`; layout "gptq")
                         or bitsandbytes' own tensors (layout "bnb")
    tokenizer files, manifest.json (stage "quantize": settings, calibration, parent, metrics)

The "gptq" layout is the GPTQ checkpoint format transformers reads (`quant_method: gptq`,
`checkpoint_format: gptq`); CompactGPT's own fields (method, activation bits, the full
settings) sit beside it under `quantization_config.compactgpt`. A quantized tied embedding /
LM head is stored once, as `lm_head.*`. Writes are atomic (see compactgpt.artifacts).

The settings (in config.json and the manifest) carry their `config_version`; loading refuses
settings of a newer version, and settings without one (older artifacts) read as version 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compactgpt.artifacts import (FLOAT_DTYPES, WEIGHTS, Manifest, begin_write, check_complete, check_config_size,
                                  check_tensor, config_from_hf, finish_write, hf_config_dict, hf_name, hf_shapes,
                                  meta_model, read_header, read_manifest, verify_files)
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.io import atomic_write, atomic_write_json
from compactgpt.model import GPT, HF_TRANSPOSED, GPTConfig
from compactgpt.tokenizer import Tokenizer

from . import bnb as bnb_layers
from .config import BnbInt8Config, BnbNF4Config, QuantConfig, config_from_dict
from .format import check_gptq_header, from_gptq_tensors, gptq_tensors
from .modules import QuantEmbedding, QuantLinear, quantized_linears, set_module

STAGE = "quantize"
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
# layout -> the configs whose weights it can hold
LAYOUTS = {"gptq": "integer weights with scales and zero points (rtn, gptq, awq, smoothquant)",
           "bnb": "bitsandbytes' own serialization (bnb-int8, bnb-nf4)"}


def layout_for(config: QuantConfig, layout: str | None = None) -> str:
    """The storage layout for a method; errors when the asked layout cannot hold its weights."""
    natural = "gptq" if config.integer_weights else "bnb"
    if layout is None:
        return natural
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    if layout != natural:
        if natural == "bnb":
            raise ConfigError(
                f"{config.method} weights cannot be saved in the {layout!r} layout: bitsandbytes keeps "
                "NF4/FP4 codes or LLM.int8 rows with outlier handling, not affine integer groups; "
                "save with --layout bnb, or quantize with rtn/gptq/awq for the gptq layout"
            )
        raise ConfigError(
            f"{config.method} produces affine integer weights, which the {layout!r} layout cannot "
            "hold; save with --layout gptq"
        )
    return layout


def quantization_config(config: QuantConfig, layout: str, act_bits: int | None) -> dict:
    """The `quantization_config` entry of config.json."""
    own = {"method": config.method, "layout": layout, "act_bits": act_bits, "settings": config.versioned_dict()}
    if layout == "gptq":
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": config.bits,
            "group_size": config.group_size or -1,
            "sym": config.symmetric,
            "desc_act": False,  # groups are contiguous (static groups), so no g_idx reordering
            "true_sequential": True,
            "lm_head": config.include_embeddings,
            # Per-module overrides as GPTQModel writes them (a regex on the module name): the head's bits.
            **({"dynamic": {"+:^lm_head$": {"bits": config.head_bits}}}
               if config.include_embeddings and config.bits_for("lm_head") != config.bits else {}),
            "compactgpt": own,
        }
    if isinstance(config, BnbInt8Config):
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": config.threshold,
                "compactgpt": own}
    assert isinstance(config, BnbNF4Config)
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": config.quant_type,
            "bnb_4bit_use_double_quant": config.double_quant, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_blocksize": config.blocksize, "compactgpt": own}


def _float_tensors(model: GPT, skip: set[str]) -> dict[str, torch.Tensor]:
    """Float parameters in GPT-2 names and layouts, leaving out the quantized layers' own tensors.
    The position table is float16 next to quantized embeddings (quantize_embeddings rounded it)."""
    out = {}
    half_positions = isinstance(model.transformer.wte, QuantEmbedding)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" or any(name.startswith(s + ".") and not name == s + ".bias" for s in skip):
            continue
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        dtype = torch.float16 if half_positions and name == "transformer.wpe.weight" else torch.float32
        out[name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def save_quantized(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    config: QuantConfig,
    *,
    layout: str | None = None,
    parent: str | Path | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Manifest:
    """Write a quantized model atomically. Raises ConfigError when `layout` cannot hold the method's weights."""
    layout = layout_for(config, layout)
    tensors: dict[str, torch.Tensor] = {}
    if layout == "gptq":
        layers = quantized_linears(model)
        if not layers:
            raise ConfigError("the model has no quantized layers to save; run quantize_ first")
        act_bits = {m.act_bits for m in layers.values() if m is not model.lm_head}
        for name, m in layers.items():
            for key, t in gptq_tensors(m.qweight).items():
                tensors[f"{name}.{key}"] = t.cpu()
        skip = set(layers)
        if isinstance(model.transformer.wte, QuantEmbedding):
            skip.add("transformer.wte")
        act = act_bits.pop() if len(act_bits) == 1 else None
    else:
        layers = {n: m for n, m in model.named_modules() if bnb_layers.is_bnb_module(m)}
        if not layers:
            raise ConfigError("the model has no bitsandbytes layers to save; run quantize_ first")
        for name, m in layers.items():
            for key, t in bnb_layers.bnb_tensors(m).items():
                tensors[f"{name}.{key}"] = t
        skip = set(layers)
        act = None
    tensors.update(_float_tensors(model, skip))

    hf = hf_config_dict(model.config)
    hf["quantization_config"] = quantization_config(config, layout, act)
    folder = begin_write(folder)
    atomic_write_json(folder / "config.json", hf)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    tokenizer.save(folder)
    names = ["config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return finish_write(folder, STAGE, config.versioned_dict(), parent=parent, metrics=metrics, files=names,
                        extra={"layout": layout, **(extra or {})})


@dataclass
class QuantizedArtifact:
    model: GPT
    tokenizer: Tokenizer
    manifest: Manifest | None
    folder: Path
    config: QuantConfig
    layout: str


def check_quantized_weights(path: Path, gpt_config: GPTConfig, config: QuantConfig, layout: str) -> list[str]:
    """Check a quantized weights file against its config from the header alone, and return
    the names of its quantized layers: each layer's tensors as its layout stores them (GPTQ
    int32 words and float16 scales, or bitsandbytes' int8 / packed 4-bit tensors) with the
    shapes the config implies, every other tensor float of its implied shape. Raises
    ArtifactError naming the first tensor that differs."""
    header = read_header(path)  # first: a truncated file is reported as truncated
    check_config_size(gpt_config, path)
    layer_names = sorted({k.rsplit(".", 1)[0] for k in header if k.endswith((".qweight", ".SCB"))} |
                         {k[: -len(".weight.absmax")] for k in header if k.endswith(".weight.absmax")})
    if not layer_names:
        raise ArtifactError(f"{path} holds no quantized layers; the file is damaged; quantize again")
    meta = meta_model(gpt_config)
    for name in layer_names:
        try:
            lin = meta.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise ArtifactError(f"{path}: {name} is not a projection of the model config.json describes; the "
                                "weights and config come from different models; quantize again")
        entries = {k[len(name) + 1:]: v for k, v in header.items() if k.startswith(name + ".")}
        if layout == "gptq":
            check_gptq_header(path, name, entries, config.bits_for(name), lin.in_features, lin.out_features)
        else:
            bnb_layers.check_bnb_header(path, name, entries, isinstance(config, BnbInt8Config),
                                        lin.in_features, lin.out_features)
    shapes = hf_shapes(gpt_config)
    for name, found in header.items():
        key = hf_name(name)
        if key in shapes and not any(name.startswith(n + ".") for n in layer_names):
            check_tensor(path, name, found, FLOAT_DTYPES, shapes[key])
    return layer_names


def load_quantized(folder: str | Path, verify: bool = True, device: str | torch.device = "cpu") -> QuantizedArtifact:
    """Load a quantized artifact into a GPT whose quantized layers run in PyTorch on `device`
    (built on the CPU, then moved: integer weights and bitsandbytes layers move with it).

    Raises ArtifactError for a missing, unfinished, damaged or non-quantized folder, and
    ConfigError for settings written by a newer CompactGPT (a newer `config_version`).
    """
    folder = Path(folder)
    check_complete(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{folder} has no config.json; pass a folder written by `compactgpt quantize`")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the folder is damaged; quantize again") from e
    qc = hf.pop("quantization_config", None)
    if not isinstance(qc, dict) or not isinstance(qc.get("compactgpt"), dict):
        raise ArtifactError(
            f"{folder} is not a CompactGPT quantized model (config.json has no quantization_config from "
            "CompactGPT); load float models with compactgpt.artifacts.load_model"
        )
    own = qc["compactgpt"]
    if "settings" not in own or own.get("layout") not in LAYOUTS:
        raise ArtifactError(f"{path}: quantization_config.compactgpt lacks its settings or names no known layout "
                            f"({sorted(LAYOUTS)}); the file is damaged; quantize again")
    config = config_from_dict(own["settings"])
    layout = own["layout"]
    manifest = read_manifest(folder)
    if manifest is not None and verify:
        verify_files(folder, manifest)
    if not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder} has no {WEIGHTS}; the folder is incomplete; quantize again")
    gpt_config = config_from_hf(hf, str(path))
    # Dtypes and shapes are checked from the header before any tensor is read or model built.
    layer_names = check_quantized_weights(folder / WEIGHTS, gpt_config, config, layout)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{folder / WEIGHTS} is missing, truncated or corrupted ({e}); quantize again") from e
    model = GPT(gpt_config).eval()

    for name in layer_names:
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        for k in t:
            del tensors[f"{name}.{k}"]
        if layout == "gptq":
            # On the device before the modules are built: the tied embedding and LM head then
            # share one QuantizedWeight there too (the move below keeps weights already in place).
            qw = from_gptq_tensors(t, config.bits_for(name), name).to(device)
            if name == "lm_head":
                model.lm_head = QuantLinear(qw, None)
                model.transformer.wte = QuantEmbedding(qw)
            else:
                set_module(model, name, QuantLinear(qw, t.get("bias"), own.get("act_bits")))
        elif isinstance(config, BnbInt8Config):
            set_module(model, name, bnb_layers.int8_from_tensors(t, config.threshold, name))
        else:
            lin = model.get_submodule(name)
            set_module(model, name, bnb_layers.fourbit_from_tensors(t, lin.in_features, lin.out_features, name))

    state = {}
    for name, t in tensors.items():
        if not name.startswith("transformer."):
            name = "transformer." + name
        state[name] = t.t() if name.endswith(HF_TRANSPOSED) else t
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    if not isinstance(model.transformer.wte, QuantEmbedding):
        state["lm_head.weight"] = state.get("transformer.wte.weight")
        expected.add("lm_head.weight")
    # Quantized layers were built from their own tensors above; only float parameters remain.
    float_expected = {k for k in expected if not any(k.startswith(n + ".") for n in layer_names)}
    missing = sorted(float_expected - set(state))
    unexpected = sorted(set(state) - float_expected)
    if missing or unexpected:
        raise ArtifactError(f"{folder / WEIGHTS} does not match config.json: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}; the weights and config come from different models")
    model.load_state_dict(state, strict=False)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > gpt_config.vocab_size:
        raise ArtifactError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"is {gpt_config.vocab_size}; this tokenizer belongs to another model")
    model.limit_vocab(tokenizer.vocab_size)  # padding rows past the tokenizer are never predicted
    return QuantizedArtifact(model.to(device).eval(), tokenizer, manifest, folder, config, layout)
