"""Checks an ONNX export folder before anything runs it.

Two checks, both ending in one ArtifactError that names the file and the fix:

* `verify_export_files` (before a session is created): the sha256 of every file the manifest
  lists (model.onnx, model.onnx.data, config.json, tokenizer files, ...). ONNX Runtime loads a
  graph with a flipped weight byte without complaint and computes inf/NaN logits from it, so
  the bytes are checked before ONNX Runtime ever parses them. Hashing reads every byte once
  (about 1 s per GB on one core); `OnnxDecoder(verify=False)` skips it for callers that have
  just verified the folder themselves.
* `check_config_matches_graph` (on the session's own inputs and outputs, before any run):
  config.json's n_layer / n_head / n_embd / vocab_size against the graph's KV names and the
  static axes of its KV and logits tensors, and n_positions against the value the exporter
  recorded in the graph's metadata. This also covers folders without a manifest (written by
  hand or by another tool), whose bytes cannot be checked: a config from another model would
  otherwise reach ONNX Runtime as a shape error deep inside a run, or silently change the
  windows perplexity is computed over.
"""

from __future__ import annotations

from pathlib import Path

from compactgpt.artifacts import read_manifest, resolved_parent, verify_files
from compactgpt.errors import ArtifactError
from compactgpt.model import GPTConfig

from .spec import MODEL_FILE, DecoderSpec

# Key of the graph metadata entry (and of the manifest's extra["spec"]) holding the positions
# the model was exported with: the graph itself only shows them inside the wpe initializer.
N_POSITIONS_KEY = "n_positions"


def _reexport(folder: Path, parent: str | None) -> str:
    model = parent or "MODEL"
    return f"re-export it: compactgpt export --model {model} --out {folder}"


def verify_export_files(folder: str | Path) -> None:
    """Check every file the folder's manifest lists against its recorded sha256.

    A folder without a manifest has nothing to check against and passes (the graph check still
    runs). Raises ArtifactError naming the first missing or changed file and the re-export."""
    folder = Path(folder)
    manifest = read_manifest(folder)  # raises for an unfinished folder or a damaged manifest
    if manifest is None:
        return
    parent = resolved_parent(folder, manifest)
    verify_files(folder, manifest, fix=_reexport(folder, str(parent) if parent else None))


def recorded_n_positions(session, folder: Path) -> int | None:
    """The positions the exporter recorded: graph metadata first, then the manifest; None for
    exports older than the record."""
    value = session.get_modelmeta().custom_metadata_map.get(N_POSITIONS_KEY)
    if value is None:
        manifest = read_manifest(folder)
        value = ((manifest.extra if manifest else {}).get("spec") or {}).get(N_POSITIONS_KEY)
    return None if value is None else int(value)


def _graph_layers(names: set[str], spec: DecoderSpec) -> int:
    n = 0
    while spec.past_key(n) in names:
        n += 1
    return n


def check_config_matches_graph(folder: str | Path, config: GPTConfig, session) -> None:
    """Raise ArtifactError when config.json does not describe the graph ONNX Runtime loaded.

    session: an ONNX Runtime InferenceSession (get_inputs/get_outputs/get_modelmeta). Only axes
    the graph fixes are compared; dynamic ones (batch, sequence, past) say nothing."""
    folder = Path(folder)
    spec = DecoderSpec.from_config(config)
    inputs = {a.name: a for a in session.get_inputs()}
    outputs = {a.name: a for a in session.get_outputs()}
    where = f"{folder / 'config.json'} disagrees with {folder / MODEL_FILE}"
    fix = f"the config belongs to another model: restore the exported config.json or {_reexport(folder, None)}"
    basic = [spec.input_ids, spec.attention_mask, spec.position_ids, spec.past_key(0)]
    if any(n not in inputs for n in basic) or spec.logits not in outputs:
        raise ArtifactError(
            f"{folder / MODEL_FILE} lacks the inputs/outputs of a CompactGPT decoder ({', '.join(basic)}, "
            f"{spec.logits}); {_reexport(folder, None)}"
        )
    layers = _graph_layers(set(inputs), spec)
    if layers != config.n_layer:
        raise ArtifactError(f"{where}: n_layer={config.n_layer} but the graph has KV inputs for {layers} layers; {fix}")
    missing = [n for n in spec.input_names if n not in inputs] + [n for n in spec.output_names if n not in outputs]
    if missing:
        raise ArtifactError(f"{folder / MODEL_FILE} lacks {missing[:4]} of a CompactGPT decoder; {_reexport(folder, None)}")
    # (B, n_head, S, head_dim) on every KV tensor; a dynamic axis is a name (or None), never an int.
    for arg in [inputs[n] for n in spec.past_names] + [outputs[n] for n in spec.present_names]:
        heads, width = arg.shape[1], arg.shape[3]
        if isinstance(heads, int) and heads != config.n_head:
            raise ArtifactError(f"{where}: n_head={config.n_head} but the graph's {arg.name} has {heads} heads; {fix}")
        if isinstance(width, int) and width != config.head_dim:
            raise ArtifactError(
                f"{where}: n_embd={config.n_embd} / n_head={config.n_head} gives heads of width {config.head_dim} "
                f"but the graph's {arg.name} has width {width}; {fix}"
            )
    vocab = outputs[spec.logits].shape[-1]
    if isinstance(vocab, int) and vocab != config.vocab_size:
        raise ArtifactError(f"{where}: vocab_size={config.vocab_size} but the graph's logits have {vocab}; {fix}")
    recorded = recorded_n_positions(session, folder)
    if recorded is not None and recorded != config.n_positions:
        raise ArtifactError(
            f"{where}: n_positions={config.n_positions} but the model was exported with {recorded} positions "
            f"(evaluation windows and generation limits follow n_positions); {fix}"
        )
