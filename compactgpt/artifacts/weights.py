"""model.safetensors: written in GPT-2's layout, read back, and checked against config.json from
the safetensors header alone. A file whose tensors have the wrong dtype would otherwise load
(torch converts silently) and give wrong text, and a config with absurd sizes would allocate
them before any shape is compared."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ArtifactError
from ..io import atomic_write
from ..model import GPT, GPTConfig, to_hf_state_dict
from .manifest import WEIGHTS


def write_weights(path: Path, model: GPT) -> None:
    """Write the model's weights to path as GPT-2 float32 tensors (safetensors), atomically."""
    tensors = to_hf_state_dict(model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def weights_file(folder: Path) -> Path:
    """The folder's model.safetensors; ArtifactError when it has none (or only pickled weights)."""
    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / "pytorch_model.bin").is_file():
            raise ArtifactError(
                f"{folder} holds pickled weights (pytorch_model.bin), which CompactGPT never loads "
                "because unpickling can run code; convert them once with transformers "
                "(save_pretrained(..., safe_serialization=True)) and load the safetensors folder"
            )
        raise ArtifactError(f"{folder} is not a model artifact: it has no {WEIGHTS}")
    return path


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's model.safetensors. Checks nothing against config.json:
    loaders call check_float_weights (or their own header checks) first."""
    path = weights_file(folder)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{path} is truncated or corrupted ({e}); rerun the stage that wrote it, or copy the "
            "file again"
        ) from e


FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the dtypes a float folder may hold


# Buffers older GPT-2 checkpoints carry; from_hf_state_dict drops them, so they are not checked.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


DAMAGED = "the file is damaged or comes from another model; rerun the stage that wrote the folder"


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype such as "F32" or "I32", shape) of every tensor in a
    safetensors file, read from its header: nothing is allocated. Raises ArtifactError for a
    truncated or corrupted file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{path} is truncated or corrupted ({e}); rerun the stage that wrote it, or copy the file again"
        ) from e


def implied_parameters(config: GPTConfig) -> int:
    """Parameters a GPT-2 of this config holds (tied head counted once), computed, not built."""
    c, i = config.n_embd, config.n_inner
    block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * i + i) + (i * c + c)  # 2 LayerNorms + 4 projections
    return (config.vocab_size + config.n_positions) * c + config.n_layer * block + 2 * c


def check_config_size(config: GPTConfig, path: Path, source: str = "config.json") -> None:
    """Refuse a config whose sizes the weights file cannot hold, before anything is built: no
    format stores a parameter in less than 4 bits, so a file of B bytes holds at most 2B of
    them. A damaged config (vocab_size 10**9) then fails in a moment instead of allocating."""
    n, size = implied_parameters(config), path.stat().st_size
    if n > 2 * size:
        raise ArtifactError(
            f"{source} implies {n:,} parameters (vocab_size {config.vocab_size:,}, n_positions "
            f"{config.n_positions:,}, n_layer {config.n_layer:,}, n_embd {config.n_embd:,}), more than "
            f"{path} ({size:,} bytes) can hold; config.json is damaged or belongs to another model: "
            "copy the config.json that came with these weights, or rerun the stage that wrote the folder"
        )


def meta_model(config: GPTConfig) -> GPT:
    """A GPT of this config on the meta device: every module and shape, no memory. Call
    check_config_size first: even meta modules cost time per layer."""
    with torch.device("meta"):
        return GPT(config)


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The GPT-2 tensor names (with the `transformer.` prefix, tied head left out) and shapes a
    config implies, from a meta model."""
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(meta_model(config)).items()}


def hf_name(name: str) -> str | None:
    """A stored GPT-2 tensor name with the `transformer.` prefix; None for the tied head and the
    buffers from_hf_state_dict drops."""
    if name == "lm_head.weight" or name.endswith(HF_BUFFERS):
        return None
    return name if name.startswith("transformer.") else "transformer." + name


def check_tensor(path: Path, name: str, found: tuple[str, tuple[int, ...]], dtypes: tuple[str, ...],
                 shape: tuple[int, ...] | None, fix: str = DAMAGED) -> None:
    """ArtifactError naming the tensor, what it is and what it should be, unless its header
    entry `found` (dtype, shape) has one of `dtypes` and exactly `shape` (None: any shape)."""
    dtype, got = found
    if dtype not in dtypes:
        raise ArtifactError(f"{path}: tensor {name} is stored as {dtype}, expected {' or '.join(dtypes)}; {fix}")
    if shape is not None and tuple(got) != tuple(shape):
        raise ArtifactError(f"{path}: tensor {name} has shape {tuple(got)} but config.json implies "
                            f"{tuple(shape)}; {fix}")


def check_float_weights(path: Path, config: GPTConfig, extra: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check a float model's weights file against its config from the header alone: the same
    tensor names, each a float (F32/F16/BF16) of the implied shape. `extra` adds tensors
    beyond GPT-2's (a classifier's head). Raises ArtifactError naming the first tensor that
    differs, before any tensor is read."""
    header = read_header(path)  # first: a truncated file is reported as truncated
    check_config_size(config, path)
    expected = {**hf_shapes(config), **(extra or {})}
    found = {}
    for name, spec in header.items():
        key = name if extra and name in extra else hf_name(name)
        if key is not None:
            found[key] = spec
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}; the "
            "weights and config come from different models"
        )
    for name, shape in expected.items():
        check_tensor(path, name, found[name], FLOAT_DTYPES, shape,
                     "the weights and config come from different models, or the file is damaged; rerun the "
                     "stage that wrote the folder")
