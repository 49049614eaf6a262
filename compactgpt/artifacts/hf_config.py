"""config.json: GPTConfig to and from the fields transformers' GPT2Config reads."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError
from ..io import read_json
from ..model import GPTConfig
from .manifest import check_complete


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


def read_config(folder: str | Path) -> GPTConfig:
    """The GPTConfig of a finished model folder; ArtifactError when it has no valid GPT-2 config.json."""
    folder = Path(folder)
    check_complete(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a model artifact: it has no config.json. Pass a folder written by "
            "a CompactGPT stage (e.g. compactgpt pretrain) or by transformers' save_pretrained"
        )
    return config_from_hf(config_json(folder), str(path))


def config_json(folder: Path) -> dict:
    """The folder's config.json as a dict ({} when it has none); ArtifactError for a damaged one."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    return read_json(path, "a GPT-2 config (a JSON object)",
                     "the folder is damaged: rerun the stage that wrote it, or copy its config.json again", dict)


CLASSIFIER_ARCH = "GPT2ForSequenceClassification"  # transformers' class for a GPT-2 with a label head


def is_classifier(folder: str | Path) -> bool:
    """True when folder's config.json declares the sequence-classification layout."""
    try:
        return CLASSIFIER_ARCH in (config_json(Path(folder)).get("architectures") or [])
    except ArtifactError:
        return False
