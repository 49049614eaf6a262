"""Target "genai": a folder onnxruntime-genai runs as `og.Model(folder)`.

The bundle is the export's graph (model.onnx, and model.onnx.data when the weights are
external), its tokenizer and config.json, and a genai_config.json regenerated from that
config.json, so the decoder description always matches the graph it ships with. The check
runs onnxruntime-genai greedily in its own Python (see `genai_python`) and compares its tokens
with ONNX Runtime's on the export. `copy_files` and `run_genai` are shared with the mobile
target, whose bundle onnxruntime-genai also loads.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

from compactgpt.artifacts import config_from_hf, read_config
from compactgpt.io import atomic_write_json
from compactgpt.model import GPTConfig
from compactgpt.tokenizer import Tokenizer
from export.genai import genai_config
from export.kvshare import shares_kv_cache
from export.spec import DATA_FILE, GENAI_CONFIG, MODEL_FILE

from .bundle import same_tokens_or_raise, script_json
from .config import DeployConfig, DeployError
from .files import place, tree_bytes

# onnxruntime-genai depends on the CPU onnxruntime package, which cannot live beside
# onnxruntime-gpu in one environment: it runs in a Python of its own, named by this variable
# or found at LOCAL_GENAI_PYTHON (relative to the working directory; an installed package has
# no project root to look in).
GENAI_PYTHON_ENV = "COMPACTGPT_GENAI_PYTHON"
LOCAL_GENAI_PYTHON = (Path(".venv-genai/bin/python"), Path(".venv-genai/Scripts/python.exe"))
INSTALL_HINT = "python -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai"
# What onnxruntime-genai reads besides the graph and genai_config.json: the tokenizer
# (tokenizer_config.json names its class); config.json keeps the bundle an export CompactGPT
# itself can open.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COPIED_FILES = TOKENIZER_FILES + ("config.json",)
# A 124M model generates its 24 check tokens in seconds; only a hung process takes this long.
CHECK_TIMEOUT_S = 1800

GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
folder, prompt, max_length = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=max_length, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
while not generator.is_done():
    generator.generate_next_token()
print(json.dumps([int(t) for t in generator.get_sequence(0)][len(prompt):]))
"""


def copy_files(source: Path, out: Path, names) -> list[str]:
    """Place (hard-link, else copy: files.place) each of `names` that source has; DeployError
    for a missing tokenizer, which every runtime needs and a complete export always has."""
    written = []
    for name in names:
        if not (source / name).is_file():
            if name in TOKENIZER_FILES:
                raise DeployError(f"{source} has no {name}; re-export it with `compactgpt export`, "
                                  "which writes the tokenizer beside the graph")
            continue
        place(source / name, out / name)
        written.append(name)
    return written


def genai_python() -> str | None:
    """The Python with onnxruntime-genai: $COMPACTGPT_GENAI_PYTHON when set (only it: a
    variable naming a missing file is a mistake to report, not to work around), else
    .venv-genai under the working directory. None when there is none."""
    named = os.environ.get(GENAI_PYTHON_ENV)
    if named:
        return named if Path(named).is_file() else None
    return next((str(p) for p in LOCAL_GENAI_PYTHON if p.is_file()), None)


def runtime_missing() -> str | None:
    named = os.environ.get(GENAI_PYTHON_ENV)
    python = genai_python()
    if python is None:
        where = (f"{GENAI_PYTHON_ENV}={named} does not exist" if named else
                 f"no Python with onnxruntime-genai ({GENAI_PYTHON_ENV} is not set and there is no .venv-genai here)")
        return f"{where}; install one with `{INSTALL_HINT}` or set {GENAI_PYTHON_ENV} to its python"
    try:
        probe = subprocess.run([python, "-c", "import onnxruntime_genai"], capture_output=True, text=True,
                               timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} does not run ({e}); set {GENAI_PYTHON_ENV} to a Python with onnxruntime-genai"
    if probe.returncode != 0:
        return (f"{python} cannot import onnxruntime_genai; install it there (`{python} -m pip install "
                f"onnxruntime-genai`) or set {GENAI_PYTHON_ENV} to another Python")
    return None


def write(source: Path, out: Path, config: DeployConfig, log: Callable[[str], None]) -> tuple[list[str], dict]:
    log(f"linking the graph and tokenizer of {source} into {out}")
    files = copy_files(source, out, (MODEL_FILE, DATA_FILE) + COPIED_FILES)
    atomic_write_json(out / GENAI_CONFIG, genai_config(read_config(source), share_buffer=shares_kv_cache(source / MODEL_FILE)))
    files.append(GENAI_CONFIG)
    return files, {"bytes": tree_bytes(out, files),
                   "model_bytes": tree_bytes(out, [n for n in files if n in (MODEL_FILE, DATA_FILE)])}


def bundle_config(folder: Path) -> GPTConfig:
    """The GPTConfig of a bundle's config.json, read while the bundle is still being written
    (read_config refuses a folder marked incomplete, as every bundle is during its check)."""
    path = folder / "config.json"
    return config_from_hf(json.loads(path.read_text(encoding="utf-8")), str(path))


def stop_ids(folder: Path) -> set[int]:
    """Tokens a greedy run ends at: the tokenizer's <|endoftext|> (where the reference stops)
    and genai_config.json's eos (where onnxruntime-genai stops)."""
    eos = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]["eos_token_id"]
    stops = set(eos) if isinstance(eos, list) else {eos}
    if (folder / "tokenizer.json").is_file():
        stops.add(Tokenizer.from_folder(folder).eot_id)
    return stops


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """ids up to (not including) the first stop token: the reference never reports its stop."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def run_genai(folder: Path, config: DeployConfig, prompt_ids: list[int], log: Callable[[str], None]) -> list[int]:
    """The tokens onnxruntime-genai generates greedily after prompt_ids from `folder`, up to
    config.max_new_tokens and cut at the first stop token. DeployError when it cannot run."""
    python = genai_python()
    if python is None:
        raise DeployError(runtime_missing() or "no Python with onnxruntime-genai")
    # Asked for every token the check may generate, not only as many as the reference made: when
    # the reference stopped at <|endoftext|>, onnxruntime-genai must stop there too.
    max_length = min(len(prompt_ids) + config.max_new_tokens, bundle_config(folder).n_positions)
    log(f"running onnxruntime-genai ({python})")
    output = script_json([python, "-c", GENAI_SCRIPT, str(folder), json.dumps(prompt_ids), str(max_length)],
                         "onnxruntime-genai", CHECK_TIMEOUT_S,
                         fix=f"set {GENAI_PYTHON_ENV} to a Python with onnxruntime-genai")
    try:
        ids = [int(t) for t in output]
    except (ValueError, TypeError):
        raise DeployError(f"onnxruntime-genai printed {str(output)[:200]!r}, not a token list; is {python} "
                          "a Python with onnxruntime-genai?") from None
    return until_stop(ids, stop_ids(folder))


def check(out: Path, config: DeployConfig, expected: dict, log: Callable[[str], None]) -> dict:
    ids = run_genai(out, config, expected["prompt_ids"], log)
    same_tokens_or_raise("onnxruntime-genai", expected, ids, None)
    return {"genai_tokens_match": True}
