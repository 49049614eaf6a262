"""`quantize_(model, config, calibration)`: the one entry point of every method.

Each config type maps to a handler through `HANDLERS`. Calibrated methods share one shape:
prepare (capture the inputs of the first block), calibrate (run each block on those inputs
and collect what the method needs: Hessians, activation statistics, input samples), convert
(replace the block's projections by `QuantLinear`s), then feed the block's outputs to the
next block. Memory stays about one transformer block plus its calibration activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from compactgpt.errors import ConfigError, DataError
from compactgpt.model import GPT

from . import awq as awq_math
from . import bnb as bnb_layers
from .config import (AWQConfig, BnbInt8Config, BnbNF4Config, GPTQConfig, QuantConfig, RTNConfig,
                     SmoothQuantConfig)
from .format import QuantizedWeight
from .gptq import accumulate_hessian, gptq_quantize
from .modules import QuantEmbedding, QuantLinear, set_module
from .rtn import rtn_quantize
from .smoothquant import fold_scales, fold_scales_into_values, smoothing_scales

BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Calibration windows AWQ's scale search runs through each module, and input rows (a fixed,
# spread-out subset) its clipping search scores.
AWQ_SEARCH_WINDOWS = 32
AWQ_CLIP_ROWS = 1024


# ---------------------------------------------------------------------------------------
# Calibration data


@dataclass
class CalibrationData:
    """Token windows (n, T) that calibrated methods run through the model."""

    ids: torch.Tensor
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "samples": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1])}


def load_calibration(source: str | Path, tokenizer, samples: int, seq_len: int, seed: int = 0) -> CalibrationData:
    """`samples` random windows of `seq_len` tokens from a prepared data folder's train split
    (which must share the model's tokenizer) or from raw text (a file, folder, glob or JSONL)."""
    from compactgpt.data import TokenShards, is_data_folder, read_documents

    generator = torch.Generator().manual_seed(seed)
    source = str(source)
    if is_data_folder(source):
        if (Path(source) / "tokenizer.json").read_text() != tokenizer.to_json():
            raise DataError(
                f"{source} was tokenized with a different tokenizer than the model's; pass the raw "
                "text as --calib-data so it is tokenized with the model's own tokenizer"
            )
        shards = TokenShards(source, "train")
        shards.check_window(seq_len)
        x, _ = shards.sample(samples, seq_len, generator)
        return CalibrationData(x, f"train split of {source}")
    docs, _ = read_documents(source)
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d.text) + [tokenizer.eot_id])
    if len(ids) < seq_len + 1:
        raise DataError(
            f"{source} holds {len(ids)} tokens, fewer than one calibration window of {seq_len}; "
            "give more text or lower --calib-seq-len"
        )
    tokens = torch.tensor(ids)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=generator)
    return CalibrationData(torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]), source)


def default_calibration_source(manifest, max_depth: int = 6) -> str | None:
    """The prepared data folder a model was trained on, found by following manifest parents."""
    from compactgpt.artifacts import read_manifest
    from compactgpt.data import is_data_folder

    for _ in range(max_depth):
        if manifest is None or not manifest.parent:
            return None
        path = manifest.parent.get("path")
        if not path or not Path(path).exists():
            return None
        if is_data_folder(path):
            return path
        manifest = read_manifest(path)
    return None


def validation_tokens(loaded) -> tuple[torch.Tensor, str]:
    """The text a quantized model is scored on, and its description: the val split of the data
    folder the model descends from, else what `compactgpt eval` scores by default."""
    from compactgpt.cli import eval_tokens
    from compactgpt.data import TokenShards

    data = default_calibration_source(loaded.manifest)
    if data is None:
        return eval_tokens(loaded, None)
    return torch.from_numpy(TokenShards(data, "val").all_tokens().astype(np.int64)), f"val split of {data}"


# ---------------------------------------------------------------------------------------
# Block-wise calibration plumbing


@torch.no_grad()
def embed(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The input of the first block, (n, T, C)."""
    pos = torch.arange(ids.shape[1])[None]
    return model.transformer.wte(ids) + model.transformer.wpe(pos)


@torch.no_grad()
def run_block(block: nn.Module, xs: torch.Tensor, batch: int = 16,
              hooks: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
    """Run a block on every calibration window; `hooks` see each listed module's input."""
    handles = [m.register_forward_pre_hook(lambda mod, args, f=f: f(args[0])) for m, f in (hooks or {}).items()]
    try:
        return torch.cat([block(xs[i : i + batch])[0] for i in range(0, xs.shape[0], batch)])
    finally:
        for h in handles:
            h.remove()


def _progress(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="block", leave=False)


def _replace(model: GPT, name: str, qw: QuantizedWeight, act_bits: int | None = None) -> None:
    lin = model.get_submodule(name)
    set_module(model, name, QuantLinear(qw, lin.bias, act_bits))


def _quantize_embeddings(model: GPT, qw: QuantizedWeight) -> None:
    """Tied embedding and LM head share one quantized weight."""
    model.lm_head = QuantLinear(qw, None)
    model.transformer.wte = QuantEmbedding(qw)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed, evenly spread subset of at most n rows of x (..., C) flattened to (N, C)."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]


def _check_groups(model: GPT, config: QuantConfig) -> None:
    """Fail before any work when the group size does not divide a layer's width."""
    for i, block in enumerate(model.transformer.h):
        for layer in BLOCK_LAYERS:
            lin = block.get_submodule(layer)
            config.group_for(lin.in_features, f"transformer.h.{i}.{layer}")


# ---------------------------------------------------------------------------------------
# Handlers: one per config type


@torch.no_grad()
def _rtn(model: GPT, config: RTNConfig, calib: CalibrationData | None, progress: bool) -> None:
    for i, block in enumerate(_progress(list(model.transformer.h), "rtn", progress)):
        for layer in BLOCK_LAYERS:
            name = f"transformer.h.{i}.{layer}"
            lin = model.get_submodule(name)
            _replace(model, name, rtn_quantize(lin.weight, config.bits, config.group_for(lin.in_features, name),
                                               config.symmetric))
    if config.include_embeddings:
        w = model.transformer.wte.weight
        _quantize_embeddings(model, rtn_quantize(w, config.bits, config.group_for(w.shape[1], "lm_head"),
                                                 config.symmetric))


@torch.no_grad()
def _gptq(model: GPT, config: GPTQConfig, calib: CalibrationData, progress: bool) -> None:
    xs = embed(model, calib.ids)
    for i, block in enumerate(_progress(list(model.transformer.h), "gptq", progress)):
        quantized: dict[str, QuantizedWeight] = {}
        # True-sequential: each layer sees the inputs produced by the block's layers already
        # quantized before it, so it compensates their errors too.
        for layer in BLOCK_LAYERS:
            lin = block.get_submodule(layer)
            name = f"transformer.h.{i}.{layer}"
            acc: dict[str, torch.Tensor | None] = {"H": None}

            def collect(x, acc=acc):
                acc["H"] = accumulate_hessian(acc["H"], x)

            run_block(block, xs, hooks={lin: collect})
            qw = gptq_quantize(lin.weight, acc["H"], config.bits, config.group_for(lin.in_features, name),
                               config.symmetric, config.damp_percent, config.act_order, config.block_columns)
            lin.weight.copy_(qw.dequantize())
            quantized[name] = qw
        xs = run_block(block, xs)
        for name, qw in quantized.items():
            _replace(model, name, qw)
    if config.include_embeddings:
        h = model.transformer.ln_f(xs)
        w = model.transformer.wte.weight
        H = accumulate_hessian(None, h)
        _quantize_embeddings(model, gptq_quantize(w, H, config.bits, config.group_for(w.shape[1], "lm_head"),
                                                  config.symmetric, config.damp_percent, config.act_order,
                                                  config.block_columns))


@torch.no_grad()
def _awq(model: GPT, config: AWQConfig, calib: CalibrationData, progress: bool) -> None:
    xs = embed(model, calib.ids)
    search = dict(bits=config.bits, symmetric=config.symmetric, n_grid=config.n_grid)
    for i, block in enumerate(_progress(list(model.transformer.h), "awq", progress)):
        inputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in BLOCK_LAYERS}
        hooks = {block.get_submodule(layer): (lambda x, l=layer: inputs[l].append(x)) for layer in BLOCK_LAYERS}
        out = run_block(block, xs, hooks=hooks)  # float block: AWQ keeps the float function
        X = {layer: torch.cat(v)[:AWQ_SEARCH_WINDOWS] for layer, v in inputs.items()}  # (n, T, in)
        del inputs
        attn, mlp = block.attn, block.mlp
        gs = {layer: config.group_for(block.get_submodule(layer).in_features, f"transformer.h.{i}.{layer}")
              for layer in BLOCK_LAYERS}
        through = dict(search, duo=config.duo_scaling)

        # Each scale is judged by the output of the module its layer feeds: the attention for
        # q/k/v (errors in q and k pass through the softmax), the MLP for its first layer.
        s, _ = awq_math.search_scales_through(X["attn.c_attn"], lambda x: attn(x, None, None)[0],
                                              [attn.c_attn.weight], group_size=gs["attn.c_attn"], **through)
        fold_scales(block.ln_1, [attn.c_attn], s)
        X["attn.c_attn"] = X["attn.c_attn"] / s

        s, _ = awq_math.search_scales_through(X["attn.c_proj"], attn.c_proj, [attn.c_proj.weight],
                                              group_size=gs["attn.c_proj"], **through)
        fold_scales_into_values(attn.c_attn, attn.c_proj, s)
        X["attn.c_proj"] = X["attn.c_proj"] / s

        s, _ = awq_math.search_scales_through(X["mlp.c_fc"], mlp, [mlp.c_fc.weight], group_size=gs["mlp.c_fc"],
                                              **through)
        fold_scales(block.ln_2, [mlp.c_fc], s)
        X["mlp.c_fc"] = X["mlp.c_fc"] / s
        # mlp.c_proj reads the GELU's output: no linear op to fold a scale into, so it gets the
        # clipping search alone.

        for layer in BLOCK_LAYERS:
            lin = block.get_submodule(layer)
            fixed = 2 * lin.in_features if layer == "attn.c_attn" else 0  # queries and keys
            qw = awq_math.search_clip(_rows(X[layer], AWQ_CLIP_ROWS), lin.weight, group_size=gs[layer],
                                      max_shrink=config.max_shrink, fixed_rows=fixed, **search)
            _replace(model, f"transformer.h.{i}.{layer}", qw)
        xs = out
    if config.include_embeddings:
        h = _rows(model.transformer.ln_f(xs), AWQ_CLIP_ROWS)
        w = model.transformer.wte.weight
        _quantize_embeddings(model, awq_math.search_clip(h, w, group_size=config.group_for(w.shape[1], "lm_head"),
                                                         max_shrink=config.max_shrink, **search))


@torch.no_grad()
def _smoothquant(model: GPT, config: SmoothQuantConfig, calib: CalibrationData, progress: bool) -> None:
    xs = embed(model, calib.ids)
    for i, block in enumerate(_progress(list(model.transformer.h), "smoothquant", progress)):
        amax: dict[str, torch.Tensor] = {}

        def record(x, key):
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            amax[key] = m if key not in amax else torch.maximum(amax[key], m)

        out = run_block(block, xs, hooks={block.attn.c_attn: lambda x: record(x, "attn"),
                                          block.mlp.c_fc: lambda x: record(x, "mlp")})
        fold_scales(block.ln_1, [block.attn.c_attn], smoothing_scales(amax["attn"], [block.attn.c_attn.weight], config.alpha))
        fold_scales(block.ln_2, [block.mlp.c_fc], smoothing_scales(amax["mlp"], [block.mlp.c_fc.weight], config.alpha))
        for layer in BLOCK_LAYERS:
            name = f"transformer.h.{i}.{layer}"
            lin = block.get_submodule(layer)
            qw = rtn_quantize(lin.weight, 8, config.group_for(lin.in_features, name), config.symmetric)
            _replace(model, name, qw, act_bits=8)
        xs = out  # smoothing keeps the float function, so the float outputs feed the next block
    if config.include_embeddings:
        w = model.transformer.wte.weight
        _quantize_embeddings(model, rtn_quantize(w, 8, config.group_for(w.shape[1], "lm_head"), config.symmetric))


def _no_bnb_embeddings(config: QuantConfig) -> None:
    if config.include_embeddings:
        raise ConfigError(
            f"{config.method}: bitsandbytes layers cannot hold the tied embedding / LM head; drop "
            "--include-embeddings, or use rtn/gptq/awq to quantize the embeddings"
        )


@torch.no_grad()
def _bnb_int8(model: GPT, config: BnbInt8Config, calib, progress: bool) -> None:
    _no_bnb_embeddings(config)
    for i, block in enumerate(_progress(list(model.transformer.h), "bnb-int8", progress)):
        for layer in BLOCK_LAYERS:
            name = f"transformer.h.{i}.{layer}"
            set_module(model, name, bnb_layers.to_int8_linear(model.get_submodule(name), config.threshold))


@torch.no_grad()
def _bnb_nf4(model: GPT, config: BnbNF4Config, calib, progress: bool) -> None:
    _no_bnb_embeddings(config)
    for i, block in enumerate(_progress(list(model.transformer.h), "bnb-4bit", progress)):
        for layer in BLOCK_LAYERS:
            name = f"transformer.h.{i}.{layer}"
            lin = model.get_submodule(name)
            if lin.out_features % 32:
                raise ConfigError(
                    f"bnb-nf4: bitsandbytes' CPU 4-bit kernel needs output widths divisible by 32, but {name} "
                    f"has {lin.out_features} outputs; use rtn/gptq/awq (bits 4) for this model"
                )
            set_module(model, name, bnb_layers.to_4bit_linear(lin, config.quant_type, config.blocksize,
                                                              config.double_quant))


HANDLERS: dict[type, Callable] = {
    RTNConfig: _rtn,
    GPTQConfig: _gptq,
    AWQConfig: _awq,
    SmoothQuantConfig: _smoothquant,
    BnbInt8Config: _bnb_int8,
    BnbNF4Config: _bnb_nf4,
}


@dataclass
class QuantizeReport:
    method: str
    seconds: float
    calibration: dict | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def quantize_(model: GPT, config: QuantConfig, calibration: CalibrationData | None = None,
              progress: bool = False) -> QuantizeReport:
    """Quantize a GPT in place: its projections (and, if asked, the tied embedding / LM head)
    become quantized modules.

    Raises ConfigError for a calibrated method without calibration data, a group size that
    does not divide a layer's width, or a model that is already quantized.
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"no quantization handler for {type(config).__name__}; known: "
                          f"{sorted(c.__name__ for c in HANDLERS)}")
    if any(isinstance(m, QuantLinear) or isinstance(m, QuantEmbedding) for m in model.modules()):
        raise ConfigError("the model is already quantized; quantize the float model it came from")
    if config.calibrated and calibration is None:
        raise ConfigError(
            f"{config.method} needs calibration data: pass --calib-data (text or a prepared data folder), "
            "or quantize a model whose manifest records its training data"
        )
    if config.group_size:
        _check_groups(model, config)
    model.eval()
    start = time.perf_counter()
    handler(model, config, calibration, progress)
    model.eval()  # new layers start in training mode, which changes LLM.int8's forward
    return QuantizeReport(config.method, time.perf_counter() - start,
                          calibration.describe() if calibration is not None and config.calibrated else None)
