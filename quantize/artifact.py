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

Each layout is a `handlers.Layout` registered beside the methods it stores (`gptq_layout.py`
for rtn, gptq, awq and smoothquant; `bnb.py` for bitsandbytes): this module writes and reads
the float tensors, config.json and manifest, and hands the quantized layers to the layout of
the config's type, so a new layout is a new registered handler.

The settings (in config.json and the manifest) carry their `config_version`; loading refuses
settings of a newer version, and settings without one (older artifacts) read as version 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compactgpt.artifacts import (FLOAT_DTYPES, WEIGHTS, Manifest, begin_write, check_complete, check_config_size,
                                  check_tensor, config_from_hf, finish_write, hf_config_dict, hf_name, hf_shapes,
                                  meta_model, read_header, read_manifest, verify_files)
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.io import atomic_write, atomic_write_json, read_json
from compactgpt.model import GPT, HF_TRANSPOSED, GPTConfig
from compactgpt.tokenizer import Tokenizer

# The method modules register their layouts on import.
from . import awq, bnb, gptq, rtn, smoothquant  # noqa: F401
from .config import QuantConfig, config_from_dict
from .handlers import LAYOUT_HANDLERS, Layout, layout_handler, layouts
from .modules import QuantEmbedding

STAGE = "quantize"


def layout_for(config: QuantConfig, layout: str | None = None) -> str:
    """The storage layout for a method; errors when the asked layout cannot hold its weights."""
    natural = layout_handler(config)
    if layout is None:
        return natural.name
    if layout not in layouts():
        raise ConfigError(f"unknown layout {layout!r}; choose one of {sorted(layouts())}")
    if layout != natural.name:
        raise ConfigError(natural.refusal(config, layout))
    return layout


def quantization_config(config: QuantConfig, layout: str, act_bits: int | None) -> dict:
    """The `quantization_config` entry of config.json: the layout's own keys (what transformers
    reads), then CompactGPT's (method, layout, activation bits, the full settings)."""
    own = {"method": config.method, "layout": layout, "act_bits": act_bits, "settings": config.versioned_dict()}
    return {**layout_handler(config).quantization_config(config, act_bits), "compactgpt": own}


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
    saved = layout_handler(config).save(model)
    tensors = {**saved.tensors, **_float_tensors(model, saved.layers)}

    hf = hf_config_dict(model.config)
    hf["quantization_config"] = quantization_config(config, layout, saved.act_bits)
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
    # Layers of any layout are looked for, so a file holding another layout's layer names it.
    layer_names = sorted(set().union(*(other.layer_names(header) for other in LAYOUT_HANDLERS.values())))
    if not layer_names:
        raise ArtifactError(f"{path} holds no quantized layers; the file is damaged; quantize again")
    handler = _layout_of(config, layout, path)
    meta = meta_model(gpt_config)
    for name in layer_names:
        try:
            lin = meta.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise ArtifactError(f"{path}: {name} is not a projection of the model config.json describes; the "
                                "weights and config come from different models; quantize again")
        handler.check_layer(path, name, {k[len(name) + 1:]: v for k, v in header.items() if k.startswith(name + ".")},
                            config, lin)
    shapes = hf_shapes(gpt_config)
    for name, found in header.items():
        key = hf_name(name)
        if key in shapes and not any(name.startswith(n + ".") for n in layer_names):
            check_tensor(path, name, found, FLOAT_DTYPES, shapes[key])
    return layer_names


def _layout_of(config: QuantConfig, layout: str, path: Path) -> Layout:
    """The registered layout of the config, which must be the one the file names. Raises
    ArtifactError otherwise (no save writes such a file)."""
    handler = layout_handler(config)
    if handler.name != layout:
        raise ArtifactError(f"{path}: {config.method} weights are stored in the {handler.name!r} layout, but the file "
                            f"names {layout!r}; the file is damaged; quantize again")
    return handler


def read_quantization_config(folder: Path) -> tuple[dict, dict, QuantConfig, str]:
    """(config.json without its quantization_config, CompactGPT's part of it, the settings,
    the layout) of a quantized folder. Raises ArtifactError for a missing or damaged
    config.json or one without CompactGPT's quantization_config, ConfigError for settings
    of a newer version."""
    path = folder / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{folder} has no config.json; pass a folder written by `compactgpt quantize`")
    hf = read_json(path, "a quantized model's config (a JSON object)", "the folder is damaged; quantize again", dict)
    qc = hf.pop("quantization_config", None)
    if not isinstance(qc, dict) or not isinstance(qc.get("compactgpt"), dict):
        raise ArtifactError(
            f"{folder} is not a CompactGPT quantized model (config.json has no quantization_config from "
            "CompactGPT); load float models with compactgpt.artifacts.load_model"
        )
    own = qc["compactgpt"]
    if "settings" not in own or own.get("layout") not in layouts():
        raise ArtifactError(f"{path}: quantization_config.compactgpt lacks its settings or names no known layout "
                            f"({sorted(layouts())}); the file is damaged; quantize again")
    return hf, own, config_from_dict(own["settings"]), own["layout"]


def load_quantized(folder: str | Path, verify: bool = True, device: str | torch.device = "cpu") -> QuantizedArtifact:
    """Load a quantized artifact into a GPT whose quantized layers run in PyTorch on `device`
    (built on the CPU, then moved: integer weights and bitsandbytes layers move with it).

    Raises ArtifactError for a missing, unfinished, damaged or non-quantized folder, and
    ConfigError for settings written by a newer CompactGPT (a newer `config_version`).
    """
    folder = Path(folder)
    check_complete(folder)
    hf, own, config, layout = read_quantization_config(folder)
    manifest = read_manifest(folder)
    if manifest is not None and verify:
        verify_files(folder, manifest)
    if not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder} has no {WEIGHTS}; the folder is incomplete; quantize again")
    gpt_config = config_from_hf(hf, str(folder / "config.json"))
    # Dtypes and shapes are checked from the header before any tensor is read or model built.
    layer_names = check_quantized_weights(folder / WEIGHTS, gpt_config, config, layout)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{folder / WEIGHTS} is missing, truncated or corrupted ({e}); quantize again") from e
    model = GPT(gpt_config).eval()
    handler = layout_handler(config)
    for name in layer_names:
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        for k in t:
            del tensors[f"{name}.{k}"]
        handler.load_layer(model, name, t, config, own.get("act_bits"), device)
    # Quantized layers were built from their own tensors above; only float parameters remain.
    _load_float_tensors(model, tensors, layer_names, folder / WEIGHTS)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > gpt_config.vocab_size:
        raise ArtifactError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"is {gpt_config.vocab_size}; this tokenizer belongs to another model")
    model.limit_vocab(tokenizer.vocab_size)  # padding rows past the tokenizer are never predicted
    return QuantizedArtifact(model.to(device).eval(), tokenizer, manifest, folder, config, layout)


def _load_float_tensors(model: GPT, tensors: dict[str, torch.Tensor], layer_names: list[str], path: Path) -> None:
    """Load the float tensors (GPT-2 names and layouts) around the quantized layers into the
    model. Raises ArtifactError for missing or unexpected ones."""
    state = {}
    for name, t in tensors.items():
        if not name.startswith("transformer."):
            name = "transformer." + name
        state[name] = t.t() if name.endswith(HF_TRANSPOSED) else t
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    if not isinstance(model.transformer.wte, QuantEmbedding):
        state["lm_head.weight"] = state.get("transformer.wte.weight")
        expected.add("lm_head.weight")
    float_expected = {k for k in expected if not any(k.startswith(n + ".") for n in layer_names)}
    missing = sorted(float_expected - set(state))
    unexpected = sorted(set(state) - float_expected)
    if missing or unexpected:
        raise ArtifactError(f"{path} does not match config.json: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}; the weights and config come from different models")
    model.load_state_dict(state, strict=False)
