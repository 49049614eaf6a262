"""Target `llama.cpp`: a GGUF export made ready for llama.cpp's own tools and its Python binding.

    model.gguf                 the export's file (hard-linked where the file system allows)
    tokenizer.json, ...        the tokenizer files and config.json, so CompactGPT can still read the folder
    README.md                  the commands that run it: llama-completion, llama-server, llama-cpp-python

The input is a GGUF export (`compactgpt export --format gguf`), its file checked against the
export's manifest and read with the gguf package's reader before anything is placed. The check
loads the bundle's model.gguf with llama-cpp-python, feeds it CompactGPT's token ids and takes
the argmax of the last logits at every step (no sampler chain: the comparison is argmax against
argmax), and compares those tokens with what PyTorch generates greedily from the model the GGUF
was exported from (the export's parent, float or quantized); llama.cpp's tokenization of the
prompt is compared with CompactGPT's too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from compactgpt.artifacts import folder_hash, read_manifest, resolved_parent, verify_files
from compactgpt.errors import ArtifactError
from compactgpt.io import atomic_write_text
from compactgpt.tokenizer import Tokenizer
from export.gguf import GGUF_FILE
from export.llamacpp import llama_cpp_missing, llama_step
from export.source import TOKENIZER_FILES

from .config import DeployConfig, DeployError
from .files import place, tree_bytes

SOURCE_KIND = "gguf"
README_FILE = "README.md"
COPIED_FILES = (*TOKENIZER_FILES, "config.json")


def runtime_missing() -> str | None:
    """Why llama.cpp cannot run here, or None (the export stage's own answer)."""
    return llama_cpp_missing()


def _reexport(source: Path) -> str:
    parent = resolved_parent(source, read_manifest(source))
    return f"export it again: compactgpt export --model {parent or 'MODEL'} --out {source} --format gguf --overwrite"


def read_gguf(path: Path):
    """The gguf package's reader over `path`; ArtifactError, one line, when the file does not
    parse as GGUF (the reader raises whatever numpy raises on a buffer cut short) or ends before
    its last tensor's data."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (ValueError, IndexError, KeyError ...: a reader of damaged bytes)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path} is not a readable GGUF file ({type(e).__name__}: {reason}); "
                            "export it again") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise ArtifactError(f"{path} is not a readable GGUF file (it ends at byte {size}, before its tensors' data "
                            f"ends at {end}); export it again")
    return reader


def verify_source(source: Path) -> None:
    """model.gguf and the other files of a GGUF export against its manifest's sha256, then the
    file read with the gguf package's reader: ArtifactError, one line, for either."""
    manifest = read_manifest(source)  # raises for an unfinished folder or a damaged manifest
    if manifest is not None:
        verify_files(source, manifest, fix=_reexport(source))
    read_gguf(source / GGUF_FILE)


def readme(source: Path, config: DeployConfig, n_ctx: int, types: dict) -> str:
    """README.md of the bundle: how to run model.gguf with llama.cpp's tools and its binding."""
    prompt = config.prompt
    # llama.cpp reads escapes in -p (\\n, \\t, \\\\: its -e is on by default), then the shell reads
    # the double-quoted word: the prompt is escaped for the one, then for the other.
    escaped = prompt.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    shell_prompt = "".join("\\" + c if c in '\\"$`' else c for c in escaped)
    # The JSON body inside single quotes: a quote in it closes, escapes and reopens them.
    body = json.dumps({"prompt": prompt, "n_predict": config.max_new_tokens, "temperature": 0}).replace("'", "'\\''")
    weights = ", ".join(f"{n} {k}" for k, n in sorted(types.items())) if types else "see manifest.json"
    return f"""# {source.name} for llama.cpp

`model.gguf` is a CompactGPT model in llama.cpp's `gpt2` architecture (tensors: {weights}), with
its tokenizer inside the file; its context is {n_ctx} tokens. It is a base model with no chat
template: run it as plain text completion. `--temp 0` generates greedily, the tokens
`compactgpt deploy` compared with PyTorch's (see `metrics` in manifest.json).

## Command line

```sh
llama-completion -m model.gguf -no-cnv -p "{shell_prompt}" -n {config.max_new_tokens} --temp 0
```

`llama-completion` is llama.cpp's plain completion program in current releases; older releases
call it `llama-cli` (same flags; `-no-cnv` keeps it from starting a chat). Current `llama-cli` is
a chat interface, which needs a chat template this model does not have.

## Server

```sh
llama-server -m model.gguf --port 8080
```

```sh
curl http://localhost:8080/completion -H "Content-Type: application/json" \\
  -d '{body}'
```

The reply's `content` is the continuation.

## Python (llama-cpp-python)

```python
from llama_cpp import Llama

llm = Llama(model_path="model.gguf", n_ctx={n_ctx}, verbose=False)
out = llm({prompt!r}, max_tokens={config.max_new_tokens}, temperature=0)
print(out["choices"][0]["text"])
```

The other files (config.json, tokenizer.json, ...) are CompactGPT's: llama.cpp needs only
model.gguf.
"""


def write(source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> tuple[list[str], dict]:
    from compactgpt.artifacts import read_config

    n_ctx = read_config(source).n_positions
    manifest = read_manifest(source)
    types = (manifest.extra.get("tensor_types") or {}) if manifest else {}
    log(f"linking {GGUF_FILE} and the tokenizer of {source} into {out}")
    files = []
    for name in (GGUF_FILE, *COPIED_FILES):
        if not (source / name).is_file():
            raise DeployError(f"{source} has no {name}; {_reexport(source)}")
        place(source / name, out / name)
        files.append(name)
    atomic_write_text(out / README_FILE, readme(source, config, n_ctx, types))
    files.append(README_FILE)
    return files, {"bytes": tree_bytes(out, files), "gguf_bytes": (out / GGUF_FILE).stat().st_size,
                   "gguf_linked": os.path.samefile(out / GGUF_FILE, source / GGUF_FILE),
                   "gguf_tensor_types": types}


# -- the check ------------------------------------------------------------------------------------


def _parent_model(source: Path):
    """(model, tokenizer) of the artifact the GGUF export was written from, in PyTorch: its
    manifest's parent, float or quantized. DeployError when the manifest names none, the folder
    is gone, or it changed since the export (it would be another model)."""
    from export.source import load_source

    manifest = read_manifest(source)
    parent = resolved_parent(source, manifest)
    fix = "restore it, or deploy with --check never"
    if parent is None:
        raise DeployError(f"{source}'s manifest names no parent: the check runs PyTorch on the model the GGUF was "
                          "exported from; export it with `compactgpt export --format gguf`, or deploy with "
                          "--check never")
    if not parent.is_dir():
        raise DeployError(f"{parent}, the model {source} was exported from, is gone: the check runs PyTorch on it; "
                          f"{fix}")
    recorded = (manifest.parent or {}).get("sha256")
    if recorded and folder_hash(parent) != recorded:
        raise DeployError(f"{parent} changed after {source} was exported from it: its weights are another model's; "
                          f"{fix}, or export it again with --format gguf")
    model, tokenizer, _ = load_source(parent, "gguf")
    return model.eval(), tokenizer, parent


def reference_tokens(source: Path, config: DeployConfig, log: Callable[[str], None]) -> dict:
    """{"prompt_ids", "new_ids", "text", "margins"}: what PyTorch generates greedily (temperature
    0, stopping at <|endoftext|>) from the model the GGUF was exported from, and at each new token
    the gap between its two largest logits (how near a tie each choice was). An empty prompt
    starts a new document (<|endoftext|>), as `compactgpt generate` does."""
    import torch

    from compactgpt.device import cpu_threads

    model, tokenizer, parent = _parent_model(source)
    log(f"greedy reference: PyTorch on {parent}")
    ids = tokenizer.encode(config.prompt) if config.prompt else [tokenizer.eot_id]
    n = max(min(config.max_new_tokens, model.config.n_positions - len(ids)), 0)
    new: list[int] = []
    with cpu_threads(config.threads), torch.no_grad():
        for token in model.stream(torch.tensor([ids]), n, temperature=0.0, stop_tokens=(tokenizer.eot_id,)):
            if int(token[0]) == tokenizer.eot_id:
                break
            new.append(int(token[0]))
        # One pass over the whole text gives the logits every new token was chosen from.
        logits = model(torch.tensor([ids + new])).logits[0, len(ids) - 1:len(ids) - 1 + len(new)].float()
        top = torch.topk(logits, 2, dim=-1).values if len(new) else torch.zeros(0, 2)
    margins = [float(a - b) for a, b in top.tolist()]
    return {"prompt_ids": ids, "new_ids": new, "text": tokenizer.decode(new), "margins": margins}


def greedy_llama(llm, prompt_ids: list[int], max_new_tokens: int, stop: int) -> list[int]:
    """The tokens llama.cpp computes greedily after prompt_ids: the one sampling loop
    (`compactgpt.sampling.stream_tokens`, temperature 0: the argmax of llama.cpp's logits, not its
    own sampler chain) over `export.llamacpp.llama_step`, up to max_new_tokens or (not included)
    `stop`. `llm`: a llama_cpp.Llama with an empty context."""
    import torch

    from compactgpt.sampling import stream_tokens

    new: list[int] = []
    if max_new_tokens <= 0:
        return new
    n_ctx = len(prompt_ids) + max_new_tokens  # the caller keeps this within the model's positions
    for token in stream_tokens(llama_step(llm, llm.n_vocab()), torch.tensor([prompt_ids]), max_new_tokens, n_ctx,
                               temperature=0.0, stop_tokens=(stop,)):
        if int(token[0]) == stop:
            break
        new.append(int(token[0]))
    return new


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check(out: Path, config: DeployConfig, expected: dict, log: Callable[[str], None]) -> dict:
    import llama_cpp

    from compactgpt.artifacts import config_from_hf

    hf = json.loads((out / "config.json").read_text(encoding="utf-8"))
    n_ctx = config_from_hf(hf, str(out / "config.json")).n_positions
    tokenizer = Tokenizer.from_folder(out)  # read_config refuses the bundle while it is being written
    version = getattr(llama_cpp, "__version__", None)
    log(f"running llama.cpp (llama-cpp-python {version})")
    llm = llama_cpp.Llama(model_path=str(out / GGUF_FILE), n_ctx=n_ctx, verbose=False, n_threads=config.threads,
                          n_threads_batch=config.threads)
    try:
        if config.prompt:
            theirs = llm.tokenize(config.prompt.encode("utf-8"), add_bos=False, special=False)
            ours = tokenizer.encode(config.prompt)
            if theirs != ours:
                i = first_difference(theirs, ours)
                raise DeployError(f"llama.cpp tokenizes the prompt otherwise than CompactGPT from token {i} on: "
                                  f"{theirs[i:i + 5]} vs {ours[i:i + 5]}; the tokenizer inside model.gguf is not "
                                  "the export's: export it again with --format gguf")
        # Asked for every token the check may generate, not only as many as the reference made:
        # when the reference stopped at <|endoftext|>, llama.cpp must stop there too.
        limit = min(config.max_new_tokens, n_ctx - len(expected["prompt_ids"]))
        got = greedy_llama(llm, expected["prompt_ids"], limit, tokenizer.eot_id)
    finally:
        if hasattr(llm, "close"):
            llm.close()
    want, margins = expected["new_ids"], expected.get("margins") or []
    if got != want:
        i = first_difference(got, want)
        gap = (f" (PyTorch's two most likely tokens there are {margins[i]:.3g} apart in logit)"
               if i < len(margins) else "")
        raise DeployError(f"llama.cpp generated other tokens than PyTorch from token {i} on: {got[i:i + 5]} vs "
                          f"{want[i:i + 5]}{gap}")
    log(f"llama.cpp generated the same {len(want)} tokens as PyTorch")
    return {"llamacpp_tokens_match": True,
            # None: an empty prompt, nothing to tokenize
            "llamacpp_tokenization_match": True if config.prompt else None,
            "reference_min_logit_margin": min(margins) if margins else None,
            "llamacpp_python": version}
