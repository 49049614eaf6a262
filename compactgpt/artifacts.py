"""Self-describing artifact folders.

A model artifact *is* a Hugging Face GPT-2 folder:

    config.json            model_type "gpt2", GPT2Config fields
    model.safetensors      GPT-2 tensor names and Conv1D layouts (lm_head tied, left out)
    tokenizer.json         plus tokenizer_config.json and special_tokens_map.json
    manifest.json          CompactGPT's record: stage, settings, parent and its hash,
                           library versions, metrics, and the sha256 of every file

so `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it, and a folder saved by
transformers loads here. Writes are atomic: a `.incomplete` marker is written first and the
manifest is removed, every file is written to a temporary name and renamed, the manifest is
written last and the marker removed. A folder with the marker never loads.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ArtifactError, ConfigError
from .io import atomic_write, atomic_write_json, sha256_file
from .model import GPT, GPTConfig, from_hf_state_dict, to_hf_state_dict
from .tokenizer import Tokenizer

MANIFEST = "manifest.json"
INCOMPLETE = ".incomplete"
WEIGHTS = "model.safetensors"
FORMAT = "compactgpt-artifact"
FORMAT_VERSION = 1

_TRACKED_LIBRARIES = ("compactgpt", "torch", "transformers", "tokenizers", "safetensors", "numpy")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes an artifact."""
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES + extra:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# ---------------------------------------------------------------------------------------
# Manifest


@dataclass
class Manifest:
    stage: str
    settings: dict[str, Any]
    parent: dict[str, str] | None = None  # {"path": ..., "sha256": ...}
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "created": self.created,
            "settings": self.settings,
            "parent": self.parent,
            "metrics": self.metrics,
            "versions": self.versions,
            "files": self.files,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            stage=d["stage"],
            settings=d.get("settings", {}),
            parent=d.get("parent"),
            metrics=d.get("metrics", {}),
            files=d.get("files", {}),
            versions=d.get("versions", {}),
            created=d.get("created", ""),
            extra=d.get("extra", {}),
        )


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, None when it has none; errors on an unfinished or damaged one."""
    folder = Path(folder)
    check_complete(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rerun the stage that wrote {folder}") from e
    if d.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a CompactGPT manifest (format={d.get('format')!r})")
    manifest = Manifest.from_dict(d)
    # Settings stored relative to the folder (see _write_manifest) read as the paths they name now.
    for key in d.get(RELATIVE_PATHS, []):
        if isinstance(manifest.settings.get(key), str):
            manifest.settings[key] = os.path.normpath(os.path.join(os.path.abspath(folder), manifest.settings[key]))
    return manifest


# Manifest key: the settings whose paths the file stores relative to the artifact's folder.
RELATIVE_PATHS = "relative_paths"


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest, every absolute path among its settings (the folders a pipeline or a
    user named) stored relative to the artifact's folder: the file names no directory of the
    machine that wrote it, and the paths still hold when the run folder moves as a whole.
    read_manifest turns them back into paths."""
    d = manifest.to_dict()
    settings, relative = dict(d["settings"]), []
    here = os.path.abspath(folder)
    for key, value in settings.items():
        if isinstance(value, str) and os.path.isabs(value):
            try:
                settings[key] = Path(os.path.relpath(value, here)).as_posix()
            except ValueError:  # another drive (Windows): no relative path exists
                continue
            relative.append(key)
    d["settings"] = settings
    if relative:
        d[RELATIVE_PATHS] = relative
    atomic_write_json(folder / MANIFEST, d)


def check_complete(folder: Path) -> None:
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist or is not a folder; pass the folder a stage wrote")
    if (folder / INCOMPLETE).exists():
        raise ArtifactError(
            f"{folder} was interrupted while being written and is incomplete; "
            "rerun the stage that writes it (its checkpoint, if any, is kept)"
        )


def folder_hash(folder: str | Path) -> str:
    """A content hash of an artifact: over its manifest's file hashes when it has a manifest,
    else over the files that define a GPT-2 folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.files:
        lines = [f"{name}:{digest}" for name, digest in sorted(manifest.files.items())]
    else:
        names = [n for n in ("config.json", WEIGHTS, "tokenizer.json") if (folder / n).is_file()]
        lines = [f"{n}:{sha256_file(folder / n)}" for n in names]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def parent_record(folder: str | Path | None, relative_to: str | Path | None = None) -> dict[str, str] | None:
    """{"path", "sha256"} of the folder an artifact came from. The path is relative to
    `relative_to` (the artifact's own folder) when given, so a run folder moved or copied to
    another machine keeps its lineage; resolved_parent reads both forms."""
    if folder is None:
        return None
    path = Path(folder).resolve()
    if relative_to is not None:
        path = Path(os.path.relpath(path, Path(relative_to).resolve()))
    return {"path": str(path), "sha256": folder_hash(folder)}


def resolved_parent(folder: str | Path, manifest: "Manifest | None") -> Path | None:
    """The parent folder a manifest names, as a path usable from here (a relative record is
    relative to the folder itself)."""
    recorded = (manifest.parent or {}).get("path") if manifest is not None else None
    if not recorded:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else (Path(folder) / path).resolve()


def read_marker(folder: str | Path) -> dict:
    """What the `.incomplete` marker of folder records ({} when there is none or it is not
    JSON): the stage writing it and the files of the artifact it replaces."""
    try:
        d = json.loads((Path(folder) / INCOMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _remove_stray_temporaries(folder: Path) -> None:
    # atomic_write's temporaries are named .NAME.XXXX.tmp; one survives only when its writer was
    # killed, and the output lock (compactgpt.outputs) guarantees no other writer is running.
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def begin_write(folder: str | Path, stage: str | None = None) -> Path:
    """Mark a folder as being written: loads of it fail until finish_write. The marker records
    the stage and the files of the artifact being replaced, so that finish_write removes those
    the new artifact does not write again (even after an interrupted write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        old = read_manifest(folder) if not (folder / INCOMPLETE).exists() else None
    except ArtifactError:  # a damaged manifest: nothing to clean up after but its own file
        old = None
    previous = set(read_marker(folder).get("previous_files", [])) | set(old.files if old else [])
    marker = {"note": "written by CompactGPT; removed when the write completes", "stage": stage,
              "previous_files": sorted(previous)}
    _remove_stray_temporaries(folder)
    atomic_write_json(folder / INCOMPLETE, marker)
    (folder / MANIFEST).unlink(missing_ok=True)
    return folder


def finish_write(
    folder: str | Path,
    stage: str,
    settings: dict,
    *,
    parent: str | Path | None = None,
    metrics: dict | None = None,
    files: list[str],
    extra: dict | None = None,
) -> Manifest:
    """Hash the listed files, write the manifest last, and clear the incomplete marker."""
    folder = Path(folder)
    manifest = Manifest(
        stage=stage,
        settings=settings,
        parent=parent_record(parent, relative_to=folder),
        metrics=metrics or {},
        files={name: sha256_file(folder / name) for name in sorted(files)},
        versions=library_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=extra or {},
    )
    # No file of the replaced artifact survives into the new one, and no temporary file either.
    for name in set(read_marker(folder).get("previous_files", [])) - set(files):
        if "/" not in name and name not in (MANIFEST, INCOMPLETE):
            (folder / name).unlink(missing_ok=True)
    _remove_stray_temporaries(folder)
    _write_manifest(folder, manifest)
    (folder / INCOMPLETE).unlink(missing_ok=True)
    return manifest


def update_metrics(folder: str | Path, metrics: dict) -> Manifest:
    """Merge metrics into an existing manifest (atomically)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder} has no {MANIFEST}; only CompactGPT artifacts record metrics")
    manifest.metrics.update(metrics)
    _write_manifest(folder, manifest)
    return manifest


# ---------------------------------------------------------------------------------------
# GPT-2 config.json


def hf_config_dict(config: GPTConfig) -> dict:
    """GPTConfig -> the config.json transformers' GPT2Config reads."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": config.activation_function,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def config_from_hf(d: dict, source: str = "config.json") -> GPTConfig:
    """A GPT-2 config.json -> GPTConfig; refuses variants this model does not implement."""
    if d.get("model_type") != "gpt2":
        raise ArtifactError(
            f"{source}: model_type is {d.get('model_type')!r}, CompactGPT reads GPT-2 folders "
            "(model_type 'gpt2') only"
        )
    unsupported = {
        "scale_attn_weights": (d.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (d.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (d.get("add_cross_attention", False), False),
        "tie_word_embeddings": (d.get("tie_word_embeddings", True), True),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ArtifactError(f"{source}: {key}={got} is not supported (CompactGPT implements {key}={want})")
    try:
        return GPTConfig(
            vocab_size=d["vocab_size"],
            n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_inner=d.get("n_inner"),
            activation_function=d.get("activation_function", "gelu_new"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            dropout=d.get("resid_pdrop", 0.0),
            bos_token_id=d.get("bos_token_id", 50256),
            eos_token_id=d.get("eos_token_id", 50256),
        )
    except KeyError as e:
        raise ArtifactError(f"{source} lacks the field {e.args[0]!r} a GPT-2 config needs") from e
    except ValueError as e:
        raise ArtifactError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------
# Model folders


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    manifest: Manifest | None
    folder: Path


def write_weights(path: Path, model: GPT) -> None:
    tensors = to_hf_state_dict(model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def save_model(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    stage: str,
    settings: dict,
    parent: str | Path | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> Manifest:
    """Write a model artifact atomically (see the module docstring).

    extra_files maps a file name to a function that writes it at the given path; later
    stages use it to add their own files (a prompt template, label names, ...).
    """
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; the model must have a row for every token"
        )
    folder = begin_write(folder, stage)
    atomic_write_json(folder / "config.json", hf_config_dict(model.config))
    write_weights(folder / WEIGHTS, model)
    tokenizer.save(folder)
    names = ["config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name, write in (extra_files or {}).items():
        atomic_write(folder / name, write)
        names.append(name)
    return finish_write(folder, stage, settings, parent=parent, metrics=metrics, files=names, extra=extra)


def read_config(folder: str | Path) -> GPTConfig:
    folder = Path(folder)
    check_complete(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a model artifact: it has no config.json. Pass a folder written by "
            "a CompactGPT stage (e.g. compactgpt pretrain) or by transformers' save_pretrained"
        )
    return config_from_hf(_config_json(folder), str(path))


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


# ---------------------------------------------------------------------------------------
# Checks of a weights file against its config, from the safetensors header alone: a file
# whose tensors have the wrong dtype would otherwise load (torch converts silently) and give
# wrong text, and a config with absurd sizes would allocate them before any shape is compared.

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


def verify_files(folder: Path, manifest: Manifest, fix: str = "rerun the stage that wrote it") -> None:
    """ArtifactError naming the first file of the manifest that is missing or whose sha256
    differs, and `fix`."""
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; the folder is incomplete: {fix}")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"{path} does not match its sha256 in manifest.json: it was damaged or edited after it was "
                f"written; {fix}"
            )


def refuse_non_float(folder: Path) -> None:
    """ArtifactError unless the folder holds float weights a GPT loads as they are: a quantized
    folder or an ONNX export is named as such, with the folder to pass instead."""
    kind = folder_kind(folder)
    if kind not in ("quantized", "onnx"):
        return
    manifest = read_manifest(folder)
    parent = resolved_parent(folder, manifest)
    source = f" ({parent})" if parent else ""
    if kind == "onnx":
        raise ArtifactError(f"{folder} is an ONNX export, not PyTorch weights; pass the model folder it was "
                            f"exported from{source}")
    method = (_config_json(folder).get("quantization_config") or {}).get("compactgpt", {}).get("method")
    what = f" with {method}" if method else ""
    raise ArtifactError(
        f"{folder} is already quantized{what}: its integer weights cannot be loaded as a float model or "
        f"quantized again; pass the float model it was quantized from{source}"
    )


def load_model(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """Load a CompactGPT artifact or a GPT-2 folder saved by transformers.

    Raises ArtifactError for a folder that is missing, unfinished, damaged (a tensor of the
    wrong dtype or shape, checked before anything is allocated), quantized or ONNX, not GPT-2,
    or whose tokenizer does not fit the model.
    """
    folder = Path(folder)
    config = read_config(folder)
    refuse_non_float(folder)
    manifest = read_manifest(folder)
    if manifest is not None and verify:
        verify_files(folder, manifest)
    # Names, dtypes and shapes are checked from the header before anything is allocated.
    check_float_weights(weights_file(folder), config)
    state = from_hf_state_dict(read_weights(folder))
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {config.vocab_size}; this tokenizer belongs to another model. Copy the tokenizer "
            "files of the model that produced these weights"
        )
    # Rows past the tokenizer pad the embedding (to a multiple of 64): never predicted.
    model.limit_vocab(tokenizer.vocab_size)
    return LoadedModel(model.to(device).eval(), tokenizer, manifest, folder)


def resolve_model_path(spec: str | Path, cache_dir: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id (e.g. "gpt2", "distilgpt2"),
    fetched once into the local cache (safetensors and tokenizer files only)."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise ArtifactError(f"{spec} does not exist; pass an existing model folder")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=str(spec),
            allow_patterns=["config.json", WEIGHTS, "tokenizer.json", "vocab.json", "merges.txt",
                            "tokenizer_config.json", "special_tokens_map.json"],
            cache_dir=cache_dir,
        )
    except Exception as e:  # the hub client raises many kinds; all mean "could not fetch"
        raise ArtifactError(
            f"{spec} is neither a local folder nor a model that could be fetched from the hub ({e}); "
            "pass a local GPT-2 folder (config.json + model.safetensors + tokenizer)"
        ) from e
    return Path(local)


# ---------------------------------------------------------------------------------------
# What kind of folder a path is, read from its own files

CLASSIFIER_ARCH = "GPT2ForSequenceClassification"  # transformers' class for a GPT-2 with a label head

# The kinds folder_kind returns, and what each one is.
FOLDER_KINDS = {
    "data": "a tokenizer and token shards (compactgpt tokenize)",
    "onnx": "an ONNX export with its tokenizer, run by ONNX Runtime",
    "quantized": "a model with quantized weights, run by its PyTorch layers",
    "classifier": "a GPT-2 with a classification head",
    "model": "a float GPT-2 language model",
    "deploy": "a bundle of an ONNX export for one runtime (compactgpt deploy)",
}


def _config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the folder is damaged") from e


def folder_kind(folder: str | Path) -> str:
    """What a folder holds (a key of FOLDER_KINDS), from its own files: an ONNX graph, a
    quantization_config or a classifier architecture in config.json, a data manifest.
    Raises ArtifactError for a missing or unfinished folder, or one that holds none of them."""
    folder = Path(folder)
    check_complete(folder)
    manifest = read_manifest(folder)
    # A bundle may hold a model.onnx or a config.json of its own layout: its manifest says first.
    if manifest is not None and manifest.stage == "deploy":
        return "deploy"
    if (folder / "model.onnx").is_file():
        return "onnx"
    config = _config_json(folder)
    if config:
        if "quantization_config" in config:
            return "quantized"
        if CLASSIFIER_ARCH in (config.get("architectures") or []):
            return "classifier"
        return "model"
    if manifest is not None and manifest.stage == "data":
        return "data"
    raise ArtifactError(
        f"{folder} is not an artifact: it has no config.json, model.onnx or data manifest; pass a folder "
        "written by a compactgpt verb or by transformers' save_pretrained"
    )


def is_classifier(folder: str | Path) -> bool:
    """True when folder's config.json declares the sequence-classification layout."""
    try:
        return CLASSIFIER_ARCH in (_config_json(Path(folder)).get("architectures") or [])
    except ArtifactError:
        return False
