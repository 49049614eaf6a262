"""`export_onnx`: artifact folder in, validated ONNX decoder folder out.

The output folder holds model.onnx (+ model.onnx.data for large models), the source's
config.json and tokenizer (so Optimum's ORTModelForCausalLM and onnxruntime-genai load it),
genai_config.json and a manifest whose metrics carry the parity report. It is written
atomically: a failed validation leaves it marked incomplete, so nothing loads it.

onnx and onnxruntime are imported inside the functions that use them: `import export` must
stay cheap for verbs that never export.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from compactgpt.artifacts import begin_write, finish_write, implied_parameters
from compactgpt.errors import ConfigError
from compactgpt.io import atomic_write_json

from .config import EXTERNAL_DATA_AUTO_BYTES, ExportConfig
from .errors import ExportError
from .genai import convert_to_ort, genai_config
from .source import TOKENIZER_FILES, claimed_export, load_source
from .spec import DATA_FILE, GENAI_CONFIG, MODEL_FILE, DecoderSpec
from .verify import N_POSITIONS_KEY

# fp16 exports are compared with the float PyTorch model: half precision rounds each
# activation to ~3 significant digits, so their bound is relative, like a quantized export's.
FP16_RTOL = 0.02


def weight_bytes(proto) -> int:
    """Bytes of all initializers of an onnx.ModelProto: what a decode step reads at most."""
    import onnx

    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)


def save_proto(proto, folder: Path, external: str) -> list[str]:
    """Write model.onnx (and model.onnx.data when external); returns the file names."""
    import onnx

    nbytes = weight_bytes(proto)
    use_external = external == "always" or (external == "auto" and nbytes > EXTERNAL_DATA_AUTO_BYTES)
    for name in (MODEL_FILE, DATA_FILE):
        (folder / name).unlink(missing_ok=True)
    if use_external:
        onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        return [MODEL_FILE, DATA_FILE]
    onnx.save_model(proto, str(folder / MODEL_FILE))
    return [MODEL_FILE]


def ort_dynamic_int8(folder: Path, external: bool) -> None:
    """Replace folder/model.onnx by ONNX Runtime's dynamic int8 quantization of it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = folder / "float.onnx"
    (folder / MODEL_FILE).rename(src)
    data = folder / DATA_FILE
    if data.is_file():
        data.rename(folder / "float.onnx.data")
        model = onnx.load(str(src))  # external data must be reread under its new name
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "float.onnx.data"
        onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="float.onnx.data")
    quantize_dynamic(str(src), str(folder / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=external,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    src.unlink()
    (folder / "float.onnx.data").unlink(missing_ok=True)


def make_session(path: Path, threads: int | None):
    """A CPU ONNX Runtime session of the graph at `path`, quiet, with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_graph(model, config: ExportConfig, source: Path, quantized: bool, log: Callable[[str], None],
                n_tokens: int | None = None):
    """(onnx.ModelProto, exact?) of `model` as `config` asks; exact: ONNX Runtime computes
    PyTorch's function up to float rounding (no activation quantization), so the float
    tolerance applies. n_tokens: the tokenizer's size; logits of the embedding's rows past it
    (padding) are masked in the graph. Raises ExportError for a graph that is not valid ONNX."""
    import onnx

    from .graph import BuildOptions, build_decoder, collect_projections, exact_arithmetic

    options = BuildOptions(dtype=config.dtype, fused=config.optimize, opset=config.opset,
                           accuracy_level=config.accuracy_level, int8_kernel=config.int8_kernel, n_tokens=n_tokens,
                           # n_positions: checked against config.json when the folder is opened
                           # (export.verify); the graph shows it only inside the wpe table.
                           # The source folder by name only: a shipped model file names no directory
                           # of the machine that made it (the manifest records the parent, relative).
                           extra_meta={"producer": "compactgpt", "source": source.resolve().name,
                                       N_POSITIONS_KEY: model.config.n_positions})
    log(f"building the decoder graph ({'fused' if config.optimize else 'standard ops'}, {config.dtype}"
        f"{', quantized weights' if quantized else ''})")
    projections = collect_projections(model)
    exact = exact_arithmetic(projections, config.accuracy_level) and not config.ort_int8
    proto = build_decoder(model, projections, options)
    del projections
    if config.kv_cache == "shared":
        from .kvshare import share_kv_cache

        proto = share_kv_cache(proto, DecoderSpec.from_config(model.config))
    try:
        # The checker serializes the model: over protobuf's 2 GiB limit it cannot run.
        onnx.checker.check_model(proto) if weight_bytes(proto) < EXTERNAL_DATA_AUTO_BYTES else None
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the built graph is not valid ONNX at opset {config.opset}: {e}") from e
    return proto, exact


def validate_export(folder: Path, model, spec: DecoderSpec, config: ExportConfig, exact: bool,
                    n_tokens: int | None = None) -> dict:
    """Run the written graph in ONNX Runtime against `model`; the parity report with its
    tolerance. n_tokens: the tokenizer's size (logits past it must be masked). Raises the
    signature errors of export.errors or ParityError."""
    from .validate import validate

    session = make_session(folder / MODEL_FILE, config.threads)
    np_dtype = np.float16 if config.dtype == "fp16" else np.float32
    # A shared KV cache does not take left-padded rows: those cases are not run.
    cases = dict(np_dtype=np_dtype, n_tokens=n_tokens, left_padding=config.kv_cache != "shared")
    # Integer kernels that quantize activations round differently from PyTorch's reference:
    # those exports are held to a relative bound, everything else to the float tolerance.
    if not exact or config.dtype == "fp16":
        rtol = config.quant_rtol if not exact else FP16_RTOL
        report = validate(model, session, spec, rtol=rtol, **cases)
        report["tolerance"] = {"max_logits_rel_diff": rtol}
    else:
        report = validate(model, session, spec, atol=config.atol, **cases)
        report["tolerance"] = {"atol": config.atol}
    return report


def export(config: ExportConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """The export stage: an ONNX decoder (`export_onnx`) or a GGUF file for llama.cpp
    (`export.gguf.export_gguf`), as config.format says. Returns the output folder."""
    if config.format == "gguf":
        from .gguf import export_gguf

        return export_gguf(config, log)
    return export_onnx(config, log)


def export_onnx(config: ExportConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Export config.model to config.out and validate it against PyTorch.

    Raises ArtifactError (not an artifact), ConfigError (contradictory settings), ExportError
    (a layout the graph cannot hold, or a graph whose names and axes disagree with
    export.spec) and ParityError (the export disagrees with PyTorch). Returns the output folder.
    An --out that claim_output refuses (the model folder or a folder above it, another artifact
    without config.overwrite, a run already writing it) is a ConfigError before any work.
    """
    with claimed_export(config) as (src, out):
        return _export_into(config, src, out, log)


def _export_into(config: ExportConfig, src: Path, out: Path, log: Callable[[str], None]) -> Path:
    model, tokenizer, quantized = load_source(src)
    if quantized and config.ort_int8:
        raise ConfigError(
            f"{src} is already quantized; --ort-int8 quantizes a float export. Export the float "
            "parent with --ort-int8, or drop the flag to export these integer weights"
        )
    spec = DecoderSpec.from_config(model.config)
    # The real vocabulary comes from the folder's tokenizer: the embedding may have more rows.
    n_tokens = tokenizer.vocab_size
    proto, exact = build_graph(model, config, src, quantized, log, n_tokens=n_tokens)

    out = begin_write(out, "export")
    files = save_proto(proto, out, config.external_data)
    nbytes = weight_bytes(proto)
    del proto
    if config.ort_int8:
        log("quantizing with ONNX Runtime's dynamic int8 (MatMulInteger)")
        ort_dynamic_int8(out, external=DATA_FILE in files)
    log("validating against PyTorch")
    report = validate_export(out, model, spec, config, exact, n_tokens=n_tokens)

    shutil.copyfile(src / "config.json", out / "config.json")
    files.append("config.json")
    tokenizer.save(out)
    files += list(TOKENIZER_FILES)
    atomic_write_json(out / GENAI_CONFIG, genai_config(model.config, share_buffer=config.kv_cache == "shared"))
    files.append(GENAI_CONFIG)
    if config.ort_format:
        log("converting to the ORT format")
        files += [f.name for f in convert_to_ort(out) if f.is_file()]
    kind = "ort-int8" if config.ort_int8 else ("quantized" if quantized else config.dtype)
    metrics = {
        "parity_max_logits_diff": report["max_logits_diff"],
        "parity_max_present_diff": report["max_present_diff"],
        "parity_max_logits_rel_diff": report["max_logits_rel_diff"],
        "onnx_bytes": sum((out / f).stat().st_size for f in files if f in (MODEL_FILE, DATA_FILE)),
        "initializer_bytes": nbytes,
    }
    # Bits per parameter on disk: the graph files over the model's parameters (tied matrix once).
    metrics["bits_per_parameter"] = 8 * metrics["onnx_bytes"] / implied_parameters(model.config)
    finish_write(out, "export", config.to_dict(), parent=src, metrics=metrics, files=files,
                 extra={"kind": kind, "parity": report, "spec": {"inputs": spec.input_names[:3],
                                                                 "past": spec.past_key(0), "opset": config.opset,
                                                                 N_POSITIONS_KEY: model.config.n_positions}})
    log(f"wrote {out}: max |logits diff| {report['max_logits_diff']:.3g}, "
        f"max |KV diff| {report['max_present_diff']:.3g} over {len(report['cases'])} shapes")
    return out
