"""`deploy`: an export in, a bundle for one runtime out, checked in that runtime.

Each target is a module with the same three functions:
    write(source, out, config, log) -> (files, metrics)   the bundle's files, relative to out
    runtime_missing() -> str | None                        why its runtime cannot run here
    check(out, config, expected, log) -> dict               run it; DeployError on other tokens
and optionally:
    SOURCE_KIND                                 the kind of export it takes ("onnx" when absent;
                                                "gguf" for llama.cpp)
    verify_source(source)                       ArtifactError, one line, unless the export's bytes
                                                match its manifest and its model file parses
                                                (`verify_onnx_export` when absent)
    reference_tokens(source, config, log) -> dict   the tokens the check expects, when they do not
                                                come from ONNX Runtime on a graph (llama.cpp's come
                                                from PyTorch on the export's parent)
    reference_graph(out, source, config, scratch) -> folder   the graph whose arithmetic its runtime
                                                follows when that is not the export's (a rewritten
                                                graph in the bundle, or one the target writes into
                                                the temporary folder `scratch`)
`expected` is otherwise what ONNX Runtime in Python generates greedily from that graph
(`greedy_reference`): for the export itself, the same tokens `compactgpt generate --temperature 0`
prints. The bundle is written like every artifact: marked incomplete until its manifest (stage
"deploy", parent = the export) is written.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import export  # noqa: F401  (registers the "onnx" and "gguf" folder kinds a source must be)
from compactgpt.artifacts import begin_write, finish_write, folder_kind, read_manifest, resolved_parent
from compactgpt.errors import ArtifactError
from compactgpt.outputs import claim_output

from .config import DeployConfig, DeployError

# target -> module under compactgpt.app.deploy implementing it
TARGET_MODULES = {"web": "web", "transformers.js": "transformersjs", "genai": "genai", "mobile": "mobile",
                  "llama.cpp": "llamacpp"}
# export kind -> (what it is called, the `compactgpt export` flag that writes one)
SOURCE_KINDS = {"onnx": ("an ONNX export", ""), "gguf": ("a GGUF export", " --format gguf")}


def target_module(target: str):
    return importlib.import_module(f"{__package__}.{TARGET_MODULES[target]}")


def source_kind(target: str) -> str:
    """The kind of export folder `target` deploys: "onnx" or "gguf"."""
    return getattr(target_module(target), "SOURCE_KIND", "onnx")


def check_source_kind(source: Path, target: str) -> None:
    """ArtifactError, one line, unless `source` is the kind of export `target` takes; it names
    the export command to run, and for the other kind of export the target that takes it."""
    wanted = source_kind(target)
    found = folder_kind(source)
    if found == wanted:
        return
    what, flag = SOURCE_KINDS[wanted]
    if found in SOURCE_KINDS:
        # An export of the other kind: the model it came from is the one to export again.
        parent = resolved_parent(source, read_manifest(source))
        takes = " / ".join(t for t in TARGET_MODULES if source_kind(t) == found)
        how = "with --format gguf" if flag else "to ONNX"
        raise ArtifactError(f"{source} is {SOURCE_KINDS[found][0]}, and --target {target} takes {what}: export it "
                            f"{how} first (compactgpt export --model {parent or 'MODEL'} --out EXPORT{flag}), or "
                            f"deploy this one with --target {takes}")
    raise ArtifactError(f"{source} is not {what}; export it first: compactgpt export --model {source} --out EXPORT"
                        f"{flag}, then deploy --model EXPORT")


def readable_onnx_graph(path: Path):
    """The graph of model.onnx (weights left where they are), parsed; ArtifactError, one line,
    when the file is not one: protobuf refuses most cut or damaged files, and a file cut at a
    field boundary parses into a graph with no nodes, no outputs or operators of an opset it
    does not import. A manifest rewritten to match such a file passes the hash check: this is
    what stops it before a runtime sees it."""
    import onnx
    from google.protobuf.message import DecodeError

    fix = "export it again"
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path} is not a readable ONNX graph ({reason}); {fix}") from None
    graph = proto.graph
    imported = {o.domain or "ai.onnx" for o in proto.opset_import}
    missing = sorted({n.domain or "ai.onnx" for n in graph.node} - imported)
    if not graph.node or not graph.output:
        raise ArtifactError(f"{path} is not a readable ONNX graph (it holds no nodes or no outputs: cut short?); "
                            f"{fix}")
    if missing:
        raise ArtifactError(f"{path} is not a readable ONNX graph (its nodes use {', '.join(missing)}, which it "
                            f"imports no opset of: cut short?); {fix}")
    return proto


def verify_onnx_export(source: Path) -> None:
    """The files of an ONNX export against its manifest's sha256 (export.verify), then its graph
    parsed (`readable_onnx_graph`): ArtifactError, one line, for either."""
    from export.spec import MODEL_FILE
    from export.verify import verify_export_files

    verify_export_files(source)
    readable_onnx_graph(source / MODEL_FILE)


def greedy_reference(source: str | Path, prompt: str, max_new_tokens: int,
                     verify: bool = True) -> tuple[list[int], list[int], str]:
    """(prompt ids, new ids, continuation text) that ONNX Runtime in Python generates greedily
    from the export `source`, stopping at <|endoftext|>: `compactgpt generate --temperature 0`.
    An empty prompt starts a new document (<|endoftext|>), as generate does. verify: check the
    files' hashes first (off where the caller has just done so)."""
    import torch

    from export import open_decoder

    decoder, tok = open_decoder(source, threads=2, verify=verify)
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    if len(ids) + max_new_tokens > decoder.config.n_positions:
        max_new_tokens = decoder.config.n_positions - len(ids)
    new = []
    for token in decoder.stream(torch.tensor([ids]), max_new_tokens, temperature=0.0, stop_tokens=(tok.eot_id,)):
        if int(token[0]) == tok.eot_id:
            break
        new.append(int(token[0]))
    return ids, new, tok.decode(new)


def deploy(config: DeployConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Write the bundle config.target of the export config.model into config.out and check it.

    Raises ArtifactError when the model folder is not a complete export of the kind the target
    takes (ONNX; GGUF for llama.cpp), or its model file does not parse; ConfigError for an --out
    that claim_output refuses; DeployError when the bundle cannot be built (a missing node/npm
    for web) or its runtime generates other tokens than the reference. Returns the folder."""
    source, out = Path(config.model), Path(config.out)
    if not config.model or not config.out:
        what = SOURCE_KINDS[source_kind(config.target)][0]
        raise DeployError(f"deploy needs --model ({what} folder) and --out (the folder to write)")
    check_source_kind(source, config.target)
    target = target_module(config.target)
    # The bundle's manifest hashes what is copied or derived from the export: damaged bytes must
    # not be certified (and the greedy reference reads the same, verified, files). The model file
    # is parsed too, so that a file cut short (with a manifest rewritten to match) is one line
    # here rather than a parser's traceback inside a target.
    getattr(target, "verify_source", verify_onnx_export)(source)
    missing = target.runtime_missing() if config.check != "never" else None
    if missing and config.check == "always":
        raise DeployError(f"--check always: {missing}")
    with claim_output(out, stage="deploy", inputs={"--model": source}, overwrite=config.overwrite):
        begin_write(out, "deploy")
        files, metrics = target.write(source, out, config, log)
        if config.check == "never" or missing:
            log(f"not checked: {missing}" if missing else "not checked (--check never)")
            metrics["checked"] = False
        else:
            metrics.update(_check(target, source, out, config, log))
        finish_write(out, "deploy", config.to_dict(), parent=source, metrics=metrics, files=files,
                     extra={"target": config.target})
    log(f"wrote {out} ({config.target})")
    return out


def _check(target, source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> dict:
    """Run the bundle in its runtime against ONNX Runtime in Python on the graph the bundle holds
    (or against the target's own `reference_tokens`); a rewritten graph is also compared with the
    export (recorded, not an error: it is the rewrite's documented arithmetic)."""
    if hasattr(target, "reference_tokens"):
        expected = target.reference_tokens(source, config, log)
        log(f"checking the bundle in its runtime: {len(expected['new_ids'])} greedy tokens")
        metrics = target.check(out, config, expected, log)
        metrics.update(checked=True, check_tokens=len(expected["new_ids"]))
        return metrics
    with tempfile.TemporaryDirectory(dir=out, prefix=".reference-") as scratch:
        reference = (target.reference_graph(out, source, config, Path(scratch))
                     if hasattr(target, "reference_graph") else source)
        prompt_ids, expected, text = greedy_reference(reference, config.prompt, config.max_new_tokens, verify=False)
    log(f"checking the bundle in its runtime: {len(expected)} greedy tokens")
    metrics = target.check(out, config, {"prompt_ids": prompt_ids, "new_ids": expected, "text": text}, log)
    metrics.update(checked=True, check_tokens=len(expected))
    if reference != source:
        own = greedy_reference(source, config.prompt, config.max_new_tokens, verify=False)[1]
        metrics["same_tokens_as_export"] = own == expected
        if own != expected:
            first = next((i for i, (a, b) in enumerate(zip(own, expected)) if a != b), min(len(own), len(expected)))
            log(f"note: the bundle's runtime computes with float activations, the export with int8 ones "
                f"(accuracy_level 4); their greedy tokens part at token {first} of {len(expected)}")
    return metrics


def same_tokens_or_raise(runtime: str, expected: dict, got_ids: list[int] | None, got_text: str | None) -> None:
    """DeployError unless a runtime's greedy output equals ONNX Runtime's in Python (by ids when
    it reports them, else by text)."""
    if got_ids is not None and got_ids != expected["new_ids"]:
        first = next((i for i, (a, b) in enumerate(zip(got_ids, expected["new_ids"])) if a != b),
                     min(len(got_ids), len(expected["new_ids"])))
        raise DeployError(f"{runtime} generated other tokens than ONNX Runtime in Python from token {first} on: "
                          f"{got_ids[first:first + 5]} vs {expected['new_ids'][first:first + 5]}")
    if got_text is not None and got_text != expected["text"]:
        raise DeployError(f"{runtime} generated {got_text!r}, ONNX Runtime in Python {expected['text']!r}")


def script_json(cmd: list[str], runtime: str, timeout: float, fix: str = "") -> object:
    """The JSON value a runtime's helper script prints on its last line of output. DeployError,
    one line, when the script cannot start (`fix` says what to do), runs past `timeout` seconds,
    fails, or prints no JSON."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise DeployError(f"{cmd[0]} does not run ({e})" + (f"; {fix}" if fix else "")) from None
    except subprocess.TimeoutExpired:
        raise DeployError(f"{runtime} did not finish in {timeout:.0f} s; rerun with --check never to skip the "
                          "check") from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise DeployError(f"{runtime} failed: {(result.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    try:
        return json.loads(lines[-1])
    except ValueError:
        hint = f"; {fix}" if fix else ""
        raise DeployError(f"{runtime} printed {lines[-1][:200]!r}, not the JSON line expected{hint}") from None
