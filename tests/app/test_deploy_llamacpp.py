"""`compactgpt deploy --target llama.cpp`: the bundle of a GGUF export (model.gguf linked, the
tokenizer, a README of llama.cpp's commands, the manifest), its check against PyTorch on the
export's parent, and the one-line refusals of every target: the other kind of export, and a
model file cut short whose manifest was rewritten to match.

llama-cpp-python is optional: the default suite runs the check's comparison against a stand-in
module, and a `llamacpp`-marked test runs the real one when it is installed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from compactgpt.app.cli import main
from compactgpt.app.deploy import DeployConfig, DeployError, deploy, llamacpp
from compactgpt.artifacts import read_manifest, save_model
from compactgpt.errors import ArtifactError
from compactgpt.io import sha256_file
from compactgpt.tokenizer import Tokenizer, train_bpe
from export import ExportConfig, export, export_onnx
from tests.conftest import talkative_gpt

QUIET = dict(log=lambda m: None)
PROMPT = "def main("
NEW_TOKENS = 24
ONNX_TARGETS = ("web", "transformers.js", "genai", "mobile")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A float model, its int4 (RTN, groups of 32: Q4_0) artifact, their GGUF exports and the
    float model's ONNX export."""
    from quantize import QuantizeConfig, RTNConfig, quantize_folder

    root = tmp_path_factory.mktemp("llamacpp")
    tokenizer = train_bpe(["hello world\n", "def f(x):\n    return x\n", "def main(args):\n    pass\n"] * 20,
                          vocab_size=300)
    save_model(root / "model", talkative_gpt(0), tokenizer, stage="pretrain", settings={})
    quantize_folder(QuantizeConfig(model=str(root / "model"), out=str(root / "int4"), progress=False,
                                   method=RTNConfig(bits=4, group_size=32)), **QUIET)
    return {
        "model": root / "model",
        "int4": root / "int4",
        "gguf": export(ExportConfig(model=str(root / "model"), out=str(root / "gguf"), format="gguf"), **QUIET),
        "gguf-int4": export(ExportConfig(model=str(root / "int4"), out=str(root / "gguf-int4"), format="gguf"),
                            **QUIET),
        "onnx": export_onnx(ExportConfig(model=str(root / "model"), out=str(root / "onnx")), **QUIET),
    }


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """llama-cpp-python not importable, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["deploy", *args])
    return code, capsys.readouterr().err.strip()


def cut_short(export_folder: Path, name: str, tmp_path: Path, keep: float = 0.5) -> Path:
    """A copy of the export with `name` cut to `keep` of its bytes and the manifest rewritten to
    the new hash: the hash check passes, only reading the file can tell."""
    folder = tmp_path / f"{export_folder.name}-cut"
    shutil.copytree(export_folder, folder)
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # copytree copied it: the export is untouched
    rehash(folder, name)
    return folder


def rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


# -- the bundle -----------------------------------------------------------------------------------


def test_bundle_links_model_gguf_and_writes_the_llama_cpp_commands(folders, tmp_path, no_llama_cpp):
    source = folders["gguf"]
    messages = []
    out = deploy(DeployConfig(model=str(source), target="llama.cpp", out=str(tmp_path / "b"), prompt=PROMPT),
                 log=messages.append)  # --check auto: llama-cpp-python is missing, so not checked
    names = {p.name for p in out.iterdir()}
    assert names == {"model.gguf", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "README.md", "manifest.json"}
    assert os.path.samefile(out / "model.gguf", source / "model.gguf")  # hard-linked, not copied
    manifest = read_manifest(out)
    assert manifest.stage == "deploy" and manifest.extra["target"] == "llama.cpp"
    assert set(manifest.files) == names - {"manifest.json"}
    assert manifest.files["model.gguf"] == read_manifest(source).files["model.gguf"]
    assert not manifest.parent["path"].startswith("/")  # relative: the bundle moves with its export
    m = manifest.metrics
    assert m["checked"] is False and m["gguf_linked"] is True
    assert m["gguf_bytes"] == (source / "model.gguf").stat().st_size
    assert m["gguf_tensor_types"] == read_manifest(source).extra["tensor_types"]
    assert any(msg.startswith("not checked: llama-cpp-python is not installed") for msg in messages)

    readme = (out / "README.md").read_text()
    n_ctx = json.loads((source / "config.json").read_text())["n_positions"]
    assert f'llama-completion -m model.gguf -no-cnv -p "{PROMPT}" -n {NEW_TOKENS} --temp 0' in readme
    assert "llama-server -m model.gguf --port 8080" in readme
    assert "curl http://localhost:8080/completion" in readme
    body = readme.split("-d '", 1)[1].split("'\n", 1)[0]
    assert json.loads(body) == {"prompt": PROMPT, "n_predict": NEW_TOKENS, "temperature": 0}
    assert f'Llama(model_path="model.gguf", n_ctx={n_ctx}, verbose=False)' in readme
    assert f"llm({PROMPT!r}, max_tokens={NEW_TOKENS}, temperature=0)" in readme
    assert str(tmp_path) not in readme  # no path of this machine


def test_readme_quotes_an_awkward_prompt_for_the_shell_and_for_llama_cpp(folders, tmp_path, no_llama_cpp):
    prompt = 'say "hi" $HOME\\n\nnext'
    out = deploy(DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out=str(tmp_path / "b"),
                              prompt=prompt, check="never"), **QUIET)
    readme = (out / "README.md").read_text()
    # The shell turns \" into ", \$ into $ and \\ into \; llama.cpp then turns \\ into \ and \n
    # into a newline: the prompt as given.
    assert '-p "say \\"hi\\" \\$HOME\\\\\\\\n\\\\nnext"' in readme
    body = readme.split("-d '", 1)[1].split("'\n", 1)[0]
    assert json.loads(body)["prompt"] == prompt


def test_check_always_without_llama_cpp_is_one_line_before_writing(folders, tmp_path, no_llama_cpp, capsys):
    out = tmp_path / "b"
    with pytest.raises(DeployError, match=r"--check always: llama-cpp-python is not installed: pip install -e "
                                          r"'\.\[llamacpp\]'"):
        deploy(DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out=str(out), check="always"), **QUIET)
    assert not out.exists()
    code, err = cli(capsys, "--model", str(folders["gguf"]), "--target", "llama.cpp", "--out", str(out),
                    "--check", "always")
    assert code == 2 and "\n" not in err and "llama-cpp-python is not installed" in err
    assert not out.exists()


# -- the check against a stand-in for llama-cpp-python ----------------------------------------------


def fake_llama_cpp(tokens: list[int], tokenize=None) -> types.SimpleNamespace:
    """A module standing in for llama_cpp: its Llama tokenizes with the bundle's tokenizer (or
    `tokenize`) and puts the largest logit, step after step, on the next of `tokens`."""

    class Llama:
        def __init__(self, model_path, n_ctx, verbose, n_threads, n_threads_batch):
            self.tokenizer = Tokenizer.from_folder(Path(model_path).parent)
            self.ctx = np.zeros(self.tokenizer.vocab_size, np.float32)  # the last logits
            self.steps = 0

        def n_vocab(self) -> int:
            return self.tokenizer.vocab_size

        def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
            assert add_bos is False and special is False
            return (tokenize or self.tokenizer.encode)(text.decode())

        def reset(self) -> None:  # an empty cache: this stand-in keeps none
            pass

        def eval(self, ids: list[int]) -> None:
            self.ctx[:] = 0
            if self.steps < len(tokens):
                self.ctx[tokens[self.steps]] = 1.0
            self.steps += 1

        def close(self) -> None:
            pass

    def llama_get_logits_ith(ctx, i):
        assert i == -1
        return ctx.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    return types.SimpleNamespace(Llama=Llama, llama_get_logits_ith=llama_get_logits_ith, __version__="stand-in")


@pytest.fixture(scope="module")
def reference(folders) -> dict:
    config = DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out="unused", prompt=PROMPT)
    return llamacpp.reference_tokens(folders["gguf"], config, **QUIET)


def test_reference_is_pytorch_greedy_on_the_export_parent_and_varies(folders, reference):
    from compactgpt.artifacts import load_model

    loaded = load_model(folders["model"])
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    greedy = loaded.model.generate(ids, NEW_TOKENS)[0, ids.shape[1]:].tolist()
    assert reference["prompt_ids"] == ids[0].tolist() and reference["new_ids"] == greedy
    assert len(reference["new_ids"]) == NEW_TOKENS and len(set(reference["new_ids"])) > NEW_TOKENS // 2
    assert len(reference["margins"]) == NEW_TOKENS and min(reference["margins"]) >= 0


def test_check_compares_argmax_tokens_and_tokenization(folders, reference, tmp_path, monkeypatch, no_llama_cpp):
    out = deploy(DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out=str(tmp_path / "b"),
                              prompt=PROMPT, check="never"), **QUIET)
    config = DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out=str(out), prompt=PROMPT)
    want = reference["new_ids"]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(want))
    metrics = llamacpp.check(out, config, reference, **QUIET)
    assert metrics["llamacpp_tokens_match"] and metrics["llamacpp_tokenization_match"]
    assert metrics["reference_min_logit_margin"] == min(reference["margins"])

    wrong = want[:5] + [(want[5] + 1) % 280] + want[6:]
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(wrong))
    with pytest.raises(DeployError, match=r"other tokens than PyTorch from token 5 on: .* apart in logit\)$") as e:
        llamacpp.check(out, config, reference, **QUIET)
    assert "\n" not in str(e.value)

    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(want, tokenize=lambda text: [1, 2, 3]))
    with pytest.raises(DeployError, match="tokenizes the prompt otherwise than CompactGPT from token 0 on"):
        llamacpp.check(out, config, reference, **QUIET)


def test_deploy_records_the_check(folders, tmp_path, monkeypatch, reference):
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(reference["new_ids"]))
    out = deploy(DeployConfig(model=str(folders["gguf"]), target="llama.cpp", out=str(tmp_path / "b"),
                              prompt=PROMPT, check="always"), **QUIET)
    m = read_manifest(out).metrics
    assert m["checked"] and m["llamacpp_tokens_match"] and m["check_tokens"] == NEW_TOKENS
    assert m["llamacpp_python"] == "stand-in"


def test_check_refuses_when_the_parent_changed_since_the_export(folders, tmp_path, monkeypatch, reference):
    root = tmp_path / "copy"
    shutil.copytree(folders["model"], root / "model")
    source = export(ExportConfig(model=str(root / "model"), out=str(root / "gguf"), format="gguf"), **QUIET)
    tokenizer = Tokenizer.from_folder(root / "model")
    shutil.rmtree(root / "model")  # trained again into the same folder: another model
    save_model(root / "model", talkative_gpt(1), tokenizer, stage="pretrain", settings={})
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(reference["new_ids"]))
    with pytest.raises(DeployError, match="changed after .* was exported from it"):
        deploy(DeployConfig(model=str(source), target="llama.cpp", out=str(tmp_path / "b"), check="always"),
               **QUIET)


# -- refusals: one line each ----------------------------------------------------------------------


def test_an_onnx_export_to_llama_cpp_is_refused_naming_the_gguf_export(folders, tmp_path, capsys):
    code, err = cli(capsys, "--model", str(folders["onnx"]), "--target", "llama.cpp", "--out", str(tmp_path / "b"))
    assert code == 2 and "\n" not in err
    assert "is an ONNX export, and --target llama.cpp takes a GGUF export" in err
    assert f"compactgpt export --model {folders['model'].resolve()} --out EXPORT --format gguf" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_a_gguf_export_to_an_onnx_target_is_refused_naming_the_onnx_export(folders, tmp_path, capsys, target):
    code, err = cli(capsys, "--model", str(folders["gguf"]), "--target", target, "--out", str(tmp_path / "b"))
    assert code == 2 and "\n" not in err
    assert f"is a GGUF export, and --target {target} takes an ONNX export: export it to ONNX first" in err
    assert "deploy this one with --target llama.cpp" in err
    assert not (tmp_path / "b").exists()


def test_a_model_folder_to_llama_cpp_is_refused_with_the_export_command(folders, tmp_path):
    with pytest.raises(ArtifactError, match=r"is not a GGUF export; export it first: compactgpt export --model "
                                            r".* --out EXPORT --format gguf"):
        deploy(DeployConfig(model=str(folders["model"]), target="llama.cpp", out=str(tmp_path / "b")), **QUIET)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_a_gguf_cut_short_is_one_line(folders, tmp_path, capsys, keep):
    source = cut_short(folders["gguf"], "model.gguf", tmp_path, keep)
    code, err = cli(capsys, "--model", str(source), "--target", "llama.cpp", "--out", str(tmp_path / "b"),
                    "--check", "never")
    assert code == 2 and "\n" not in err, err
    assert f"{source / 'model.gguf'} is not a readable GGUF file (" in err and err.endswith("export it again")
    assert not (tmp_path / "b").exists()


def test_a_damaged_gguf_is_refused_by_its_hash_with_the_gguf_export_command(folders, tmp_path):
    source = tmp_path / "gguf"
    shutil.copytree(folders["gguf"], source)
    data = bytearray((source / "model.gguf").read_bytes())
    data[-1] ^= 1
    (source / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"does not match its sha256 .* --format gguf"):
        deploy(DeployConfig(model=str(source), target="llama.cpp", out=str(tmp_path / "b")), **QUIET)


@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_an_onnx_graph_cut_short_is_one_line_for_every_target(folders, tmp_path, capsys, target):
    source = cut_short(folders["onnx"], "model.onnx", tmp_path)
    code, err = cli(capsys, "--model", str(source), "--target", target, "--out", str(tmp_path / "b"),
                    "--check", "never")
    assert code == 2 and "\n" not in err, err
    assert f"{source / 'model.onnx'} is not a readable ONNX graph (" in err and err.endswith("export it again")
    assert not (tmp_path / "b").exists()


def test_an_onnx_graph_cut_at_a_field_boundary_is_refused_too(folders, tmp_path):
    """A file cut right after its graph still parses: what it lost (the opset imports) is
    missed, not parsed."""
    import onnx

    source = tmp_path / "onnx"
    shutil.copytree(folders["onnx"], source)
    proto = onnx.load(str(source / "model.onnx"))
    del proto.opset_import[:]
    onnx.save_model(proto, str(source / "model.onnx"))
    rehash(source, "model.onnx")
    with pytest.raises(ArtifactError, match=r"is not a readable ONNX graph \(its nodes use .*ai\.onnx.* imports no "
                                            r"opset of: cut short\?\); export it again"):
        deploy(DeployConfig(model=str(source), target="genai", out=str(tmp_path / "b"), check="never"), **QUIET)


def test_help_lists_the_llama_cpp_target(capsys):
    with pytest.raises(SystemExit) as e:
        main(["deploy", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "llama.cpp: a GGUF export" in text and "--format gguf" in text


# -- the real llama.cpp ---------------------------------------------------------------------------


# llama.cpp's logits are within about 2.6e-3 of PyTorch's on these models (float16 KV cache, its
# default; tests/export/test_gguf.py measures them), and a tiny random model's two best tokens are
# often closer than that: a parting there is a near tie, anywhere else a fault.
NEAR_TIE = 5e-3


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["gguf", "gguf-int4"])
def test_llama_cpp_generates_what_pytorch_generates(folders, tmp_path, kind):
    """llama.cpp tokenizes the prompt as CompactGPT does and generates PyTorch's greedy tokens;
    where the two part, PyTorch's own two best tokens must have been within NEAR_TIE (the check
    still refuses the bundle then: a flipped near tie is a different text)."""
    import re

    pytest.importorskip("llama_cpp")
    config = DeployConfig(model=str(folders[kind]), target="llama.cpp", out=str(tmp_path / "b"), prompt=PROMPT,
                          check="always")
    try:
        out = deploy(config, **QUIET)
    except DeployError as e:
        parted = re.search(r"other tokens than PyTorch from token (\d+) on: .* ([0-9.e+-]+) apart in logit", str(e))
        assert parted and float(parted.group(2)) < NEAR_TIE, str(e)
        pytest.xfail(f"a near tie: {e}")
    m = read_manifest(out).metrics
    assert m["checked"] and m["llamacpp_tokens_match"] and m["llamacpp_tokenization_match"]
    assert m["check_tokens"] == NEW_TOKENS
