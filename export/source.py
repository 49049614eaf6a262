"""What an export starts from: a float model or a quantized artifact folder, loaded, with
the refusal of weights the target format has no kernel for."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compactgpt.artifacts import load_model
from compactgpt.artifacts import folder_kind
from compactgpt.device import cpu_threads
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.outputs import claim_output

from .errors import ExportError

@contextmanager
def claimed_export(config) -> Iterator[tuple[Path, Path]]:
    """(source folder, out folder) of an export config, with --out claimed (claim_output) and
    the config's CPU threads set for the block: what every export format runs inside. ConfigError
    when --model or --out is missing or --out cannot be claimed, before any work."""
    if not config.model or not config.out:
        raise ConfigError("export needs --model (an artifact folder) and --out (the folder to write)")
    src, out = Path(config.model), Path(config.out)
    with cpu_threads(config.threads), claim_output(out, stage="export", inputs={"--model": src},
                                                   overwrite=config.overwrite):
        yield src, out


# The tokenizer files every export copies beside its graph or GGUF file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# What to use instead when an artifact's weights have no kernel in the format asked for.
BITSANDBYTES_FIX = {
    "onnx": "which have no ONNX kernel; quantize with rtn, gptq, awq or smoothquant to export integer weights, or "
            "export the float parent (optionally with --ort-int8)",
    "gguf": "which have no GGUF equivalent; quantize with rtn, gptq or awq (--bits 4: Q4_0 / Q4_1, --bits 8 "
            "--symmetric: Q8_0), or export the float parent with --gguf-type q8_0",
}


def load_source(folder: Path, target: str = "onnx"):
    """(model, tokenizer, quantized?) of an artifact folder to export to `target` (onnx, gguf);
    typed errors for anything else.

    Raises ArtifactError for a missing, unfinished or non-model folder and for an ONNX export,
    ExportError for quantized weights that have no kernel in the target format."""
    kind = folder_kind(folder)
    if kind == "onnx":
        raise ArtifactError(
            f"{folder} is already an ONNX export; pass the model artifact it was exported from"
        )
    if kind != "quantized":
        loaded = load_model(folder)
        return loaded.model, loaded.tokenizer, False
    try:
        from quantize import load_quantized
    except ImportError as e:
        raise ExportError(f"{folder} is a quantized artifact but the quantize package is unavailable ({e})") from e
    q = load_quantized(folder)
    if getattr(q, "layout", "gptq") != "gptq":
        raise ExportError(f"{folder} holds bitsandbytes weights (layout {q.layout!r}), {BITSANDBYTES_FIX[target]}")
    return q.model.eval(), q.tokenizer, True
