"""Edge runtimes: the `genai_config.json` onnxruntime-genai reads, and ORT-format conversion.

onnxruntime-genai drives a decoder from names alone, which `export.spec` fixes;
`past_present_share_buffer` is on only for a graph with a shared KV cache (`--kv-cache shared`,
GroupQueryAttention), where past and present may be one buffer; MultiHeadAttention returns a
new present. The `.ort` format is what ONNX Runtime's mobile and
minimal builds load; the conversion also writes the operator list a reduced build needs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compactgpt.errors import ConfigError
from compactgpt.model import GPTConfig

from .errors import ExportError
from .spec import MODEL_FILE, DecoderSpec

# onnxruntime-genai runs every decoder-only model with one implementation; "gpt2" is not in
# its list of model types, while the decoder-only types share that implementation and differ
# only in names this config spells out.
GENAI_MODEL_TYPE = "llama"


def genai_config(config: GPTConfig, *, provider: str = "cpu", top_k: int = 50, top_p: float = 0.95,
                 temperature: float = 1.0, share_buffer: bool = False) -> dict:
    """The genai_config.json dict for an export of `config`; share_buffer: the graph's past and
    present may be one buffer (an export with --kv-cache shared)."""
    if provider not in ("cpu", "cuda"):
        raise ConfigError(f"genai provider {provider!r}: use cpu or cuda")
    spec = DecoderSpec.from_config(config)
    provider_options = [] if provider == "cpu" else [{"cuda": {}}]
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id,
            "context_length": config.n_positions,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {
                    "input_ids": spec.input_ids,
                    "attention_mask": spec.attention_mask,
                    "position_ids": spec.position_ids,
                    "past_key_names": spec.past_key(0).replace(".0.", ".%d."),
                    "past_value_names": spec.past_value(0).replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": spec.logits,
                    "present_key_names": spec.present_key(0).replace(".0.", ".%d."),
                    "present_value_names": spec.present_value(0).replace(".0.", ".%d."),
                },
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": config.n_positions,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
        },
    }


def convert_to_ort(folder: str | Path) -> list[Path]:
    """Convert folder/model.onnx to the ORT format (model.ort) for mobile and minimal builds.

    Returns the files written (the .ort model and the operator config of a reduced build).
    Raises ExportError when ONNX Runtime's converter fails.
    """
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ExportError(f"{folder} has no {MODEL_FILE} to convert")
    before = set(folder.iterdir())
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(folder / MODEL_FILE),
           "--optimization_style", "Fixed"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"ORT-format conversion failed: {result.stderr.strip()[-800:]}")
    return sorted(set(folder.iterdir()) - before)
