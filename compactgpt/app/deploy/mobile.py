"""Target "mobile": what a phone app ships to run the model with ONNX Runtime Mobile.

The bundle holds model.ort (the export converted to ONNX Runtime's ORT format, which mobile
and minimal builds load), required_operators.config (the operators a reduced ONNX Runtime
build must include: `build.sh --minimal_build --include_ops_by_config required_operators.config`),
the tokenizer, config.json, and a genai_config.json naming model.ort so onnxruntime-genai's
mobile packages load the folder as it is.

ONNX Runtime's converter writes both files; the operator list is then checked against the
operators model.ort actually uses, both read by ONNX Runtime's own readers, so a bundle never
ships a list a reduced build would fail to load the model with. The check runs model.ort in
ONNX Runtime (always here: it is the Python package the export already needs) with the KV
cache fed by the names of export.spec, and compares its greedy tokens with the export's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from compactgpt.artifacts import read_config
from compactgpt.io import atomic_write_json, atomic_write_text
from compactgpt.tokenizer import Tokenizer
from export.genai import genai_config
from export.kvshare import shares_kv_cache
from export.spec import DATA_FILE, GENAI_CONFIG, MODEL_FILE, DecoderSpec

from . import genai
from .bundle import same_tokens_or_raise
from .config import DeployConfig, DeployError
from .files import tree_bytes

ORT_FILE = "model.ort"
OPS_FILE = "required_operators.config"
# The ORT format is a FlatBuffer, whose offsets are signed 32-bit: nothing over 2 GiB fits,
# and ONNX Runtime's converter does not always say so (it can write a file it cannot read).
ORT_FORMAT_MAX_BYTES = 2**31 - 1
OPS_HEADER = """\
# Operators of {model} (ONNX Runtime {version}, optimization style Fixed), read from the model.
# A reduced ONNX Runtime build that runs it: build.sh --minimal_build --include_ops_by_config {name}
"""

Operator = tuple[str, int, str]  # (domain, opset, op type), one entry of the config


def runtime_missing() -> str | None:
    return None


def write(source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> tuple[list[str], dict]:
    import onnxruntime

    onnx_bytes = sum((source / n).stat().st_size for n in (MODEL_FILE, DATA_FILE) if (source / n).is_file())
    if onnx_bytes > ORT_FORMAT_MAX_BYTES:
        raise DeployError(
            f"{source} holds {onnx_bytes / 2**30:.2f} GiB of graph and weights, and the ORT format is limited to "
            "2 GiB (a FlatBuffer); quantize the model (compactgpt quantize --bits 4), export that and deploy it, "
            "or use --target genai, which keeps the weights in model.onnx.data"
        )
    log(f"converting {source / MODEL_FILE} to the ORT format")
    # Converted inside out, so model.ort is renamed into place rather than copied across
    # filesystems, and the export is never written to. A conversion killed midway leaves its
    # folder behind; the output lock (claim_output) means no other run is using one.
    for stale in out.glob(".ort-conversion-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".ort-conversion-") as tmp:
        ort_model, ops_config = convert(source / MODEL_FILE, Path(tmp))
        ort_model.replace(out / ORT_FILE)
        write_ops_config(ops_config, out / OPS_FILE)
    if (out / ORT_FILE).stat().st_size > ORT_FORMAT_MAX_BYTES:
        raise DeployError(f"{ORT_FILE} came out over 2 GiB, the ORT format's limit; quantize the model "
                          "(compactgpt quantize --bits 4) and deploy that, or use --target genai")
    operators = check_operator_config(out / ORT_FILE, out / OPS_FILE)
    files = [ORT_FILE, OPS_FILE] + genai.copy_files(source, out, genai.COPIED_FILES)
    settings = genai_config(read_config(source), share_buffer=shares_kv_cache(source / MODEL_FILE))
    settings["model"]["decoder"]["filename"] = ORT_FILE
    atomic_write_json(out / GENAI_CONFIG, settings)
    files.append(GENAI_CONFIG)
    ort_bytes = (out / ORT_FILE).stat().st_size
    if ort_bytes > 1.5 * onnx_bytes:
        # Seen on fp16 exports: the CPU provider has few fp16 kernels, so the converter casts
        # around them and folds fp32 copies of the weights into model.ort (2.8x the graph of the
        # tiny test model).
        log(f"note: {ORT_FILE} is {ort_bytes / onnx_bytes:.1f}x the size of {MODEL_FILE}; ONNX Runtime's CPU "
            "provider computes this graph in fp32 and stored fp32 weights (an fp16 export?): an fp32 or int4 "
            "export makes a smaller model.ort")
    return files, {
        "bytes": tree_bytes(out, files),
        "ort_bytes": ort_bytes,
        "onnx_bytes": onnx_bytes,
        "operators": len(operators),
        "contrib_operators": sum(domain != "ai.onnx" for domain, _, _ in operators),
        # The ORT format changes between releases: a phone's ONNX Runtime must read this one's.
        "onnxruntime": onnxruntime.__version__,
    }


def convert(model: Path, folder: Path) -> tuple[Path, Path]:
    """(the .ort model, its operator config) ONNX Runtime's converter writes into folder.
    DeployError with the converter's last message when it fails."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(model),
           "--optimization_style", "Fixed", "--output_dir", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    # The names carry an optimization-level suffix when ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL
    # is set; there is one of each whatever it is.
    models, configs = sorted(folder.glob("*.ort")), sorted(folder.glob("*.config"))
    if result.returncode != 0 or len(models) != 1 or len(configs) != 1:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        reason = reason.strip().removeprefix(f"Error converting {model}:").strip()
        raise DeployError(f"ONNX Runtime could not convert {model} to the ORT format: {reason[-600:]}; the converter "
                          "loads the graph with ONNX Runtime's CPU provider, which must run it: re-export the model "
                          "with `compactgpt export` (fp32, or int4 weights)")
    return models[0], configs[0]


def write_ops_config(generated: Path, dest: Path) -> None:
    """dest: the converter's operator lines under a header naming the bundle's model (the
    converter's names the temporary folder it converted in)."""
    import onnxruntime

    lines = [ln for ln in generated.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    header = OPS_HEADER.format(model=ORT_FILE, version=onnxruntime.__version__, name=OPS_FILE)
    atomic_write_text(dest, header + "".join(f"{ln}\n" for ln in lines))


def _flatten(required: dict) -> set[Operator]:
    return {(domain, int(opset), op) for domain, opsets in required.items() for opset, ops in opsets.items()
            for op in ops}


def model_operators(ort_model: Path) -> set[Operator]:
    """The (domain, opset, op) entries a reduced build needs for ort_model, read from the model
    by ONNX Runtime's own reader (the one its converter writes the config with)."""
    from onnxruntime.tools.ort_format_model import OrtFormatModelProcessor

    required: dict = {}
    try:
        OrtFormatModelProcessor(str(ort_model), required, None).process()
    except Exception as e:  # its reader raises RuntimeError for a bad file, anything for a truncated one
        raise DeployError(f"{ort_model} is not a readable ORT-format model ({e}); rebuild the bundle") from e
    return _flatten(required)


def config_operators(ops_config: Path) -> set[Operator]:
    """The (domain, opset, op) entries an operator config lists, parsed as a reduced build
    parses it (`domain;opset[,opset];Op1,Op2` lines, # comments, optional type information)."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    try:
        required, _ = parse_config(str(ops_config))
    except (ValueError, RuntimeError) as e:
        raise DeployError(f"{ops_config} is not an operator config a reduced build reads ({e}); rebuild the "
                          "bundle") from e
    if required is None:  # `!no_ops_specified_means_all_ops_are_required` and no operator line
        raise DeployError(f"{ops_config} lists no operator (a build with all of them is not reduced); "
                          "rebuild the bundle")
    return _flatten(required)


def _entries(ops: set[Operator], limit: int = 6) -> str:
    shown = [f"{d};{v};{op}" for d, v, op in sorted(ops)]
    return ", ".join(shown[:limit]) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def check_operator_config(ort_model: Path, ops_config: Path) -> set[Operator]:
    """The operators ort_model uses, after checking that ops_config lists exactly them.

    DeployError naming the difference: an operator the model uses and the config lacks makes a
    reduced build fail to load the model; one the config lists and the model does not use makes
    the build larger than it needs to be and means the list belongs to another model."""
    used, listed = model_operators(ort_model), config_operators(ops_config)
    missing, extra = used - listed, listed - used
    if missing or extra:
        parts = ([f"lacks {_entries(missing)}, which {ort_model.name} uses (a reduced build would not load it)"]
                 if missing else [])
        parts += [f"lists {_entries(extra)}, which {ort_model.name} does not use"] if extra else []
        raise DeployError(f"{ops_config} does not match {ort_model}: {'; '.join(parts)}; rebuild the bundle "
                          "(compactgpt deploy --target mobile --overwrite)")
    return used


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise DeployError(f"ONNX Runtime cannot load {path}: {e}") from e


def greedy(session, spec: DecoderSpec, prompt_ids: list[int], max_new_tokens: int, stops: set[int],
           reference=None) -> tuple[list[int], float]:
    """(new tokens, max |logits - reference logits|): greedy decoding of `session` with the KV
    cache fed back by name, stopping before a stop token. reference: a session of the same
    decoder fed the same tokens (its own cache), to measure how far the logits moved; 0.0
    without one."""
    past_type = {i.name: i.type for i in session.get_inputs()}[spec.past_key(0)]
    dtype = np.float16 if past_type == "tensor(float16)" else np.float32
    empty = [np.zeros((1, spec.n_head, 0, spec.head_dim), dtype) for _ in spec.past_names]
    caches = [list(empty), list(empty)]
    ids, length, new, diff = list(prompt_ids), 0, [], 0.0
    for _ in range(max_new_tokens):
        feeds = {spec.input_ids: np.array([ids], np.int64),
                 spec.attention_mask: np.ones((1, length + len(ids)), np.int64),
                 spec.position_ids: np.arange(length, length + len(ids), dtype=np.int64)[None]}
        outs = []
        for k, s in enumerate([session, reference] if reference is not None else [session]):
            out = s.run(spec.output_names, {**feeds, **dict(zip(spec.past_names, caches[k]))})
            caches[k] = out[1:]
            outs.append(out[0][0, -1].astype(np.float32))
        if len(outs) == 2:
            diff = max(diff, float(np.max(np.abs(outs[0] - outs[1]))))
        token = int(np.argmax(outs[0]))
        if token in stops:
            break
        new.append(token)
        length += len(ids)
        ids = [token]
    return new, diff


def check(out: Path, config: DeployConfig, expected: dict, log: Callable[[str], None]) -> dict:
    cfg = genai.bundle_config(out)
    spec = DecoderSpec.from_config(cfg)
    max_new = min(config.max_new_tokens, cfg.n_positions - len(expected["prompt_ids"]))
    log(f"running {ORT_FILE} in ONNX Runtime beside {MODEL_FILE} of the export")
    session = _session(out / ORT_FILE, config.threads)
    reference = _session(Path(config.model) / MODEL_FILE, config.threads)
    # Only <|endoftext|> ends the reference (compactgpt generate), whatever config.json's eos says.
    stops = {Tokenizer.from_folder(out).eot_id}
    ids, diff = greedy(session, spec, expected["prompt_ids"], max_new, stops, reference)
    same_tokens_or_raise(f"ONNX Runtime on {ORT_FILE}", expected, ids, None)
    result = {"ort_tokens_match": True, "ort_max_logits_diff": diff}
    # onnxruntime-genai is what an app drives model.ort with; where it is installed, the bundle
    # is checked through it too (its genai_config.json is otherwise never read here).
    if genai.runtime_missing() is None:
        same_tokens_or_raise("onnxruntime-genai on model.ort", expected,
                             genai.run_genai(out, config, expected["prompt_ids"], log), None)
        result["genai_tokens_match"] = True
    return result
