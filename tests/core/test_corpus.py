"""Corpus sources and the streamed data stage: dedup, package hold-out, combined specs,
Parquet / hub sources, shards written as they fill, resume, and byte-identical output."""

import hashlib
import importlib.metadata
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from compactgpt.data import shards as shards_module
from compactgpt.data import tokenize as tokenize_module
from compactgpt.corpus import SITE_PACKAGES, iter_documents, read_documents, site_packages_files, split_spec
from compactgpt.data import DataConfig, TokenShards, hash_score, prepare_data, split_documents
from compactgpt.errors import DataError


def _write_pinned_folder(src: Path) -> None:
    """The small folder source whose shards were hashed with the data stage as it was before
    streaming (read everything, encode, cut): the streamed stage must write the same bytes."""
    src.mkdir(parents=True)
    for i in range(40):
        sub = src / f"pkg{i % 5}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n"
                                                for j in range(30 + i)))
    (src / "notes.md").write_text("# Notes\n" + "some words here and there\n" * 50)
    (src / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {k} says hello {k*k}"}) + "\n"
                                            for k in range(30)))


# sha256 of the files the pre-streaming data stage wrote for _write_pinned_folder (tokenizers 0.x
# BPE is deterministic; a new tokenizers release that changes training would change these).
_PINNED = {
    "tokenizer.json": "daf5d0352d61cb86d7fce43d50e03e604a219e4ba8563820364d8273296594ae",
    "train_000.bin": "9f63ca591f1817019160d0e143e7c9c47d216a2fc3363a0cd7147b6cc77dc452",
    "val_000.bin": "f919f961a1d19686be2ba77873ea0444b1130e07e66c2420ee0e1cf86e839ee0",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_folder_shards_are_byte_identical_to_the_previous_implementation(tmp_path):
    _write_pinned_folder(tmp_path / "src")
    out = prepare_data(DataConfig(source=str(tmp_path / "src"), vocab_size=300, val_fraction=0.2,
                                  out=str(tmp_path / "out")), log=lambda m: None)
    assert {name: _sha(out / name) for name in _PINNED} == _PINNED
    m = json.loads((out / "manifest.json").read_text())
    assert (m["metrics"]["train_tokens"], m["metrics"]["val_tokens"]) == (45368, 2375)
    assert m["metrics"]["duplicates"] == 0 and m["metrics"]["peak_memory_mb"] > 0
    assert not (out / ".data-progress.json").exists()


def _all_tokens(folder: Path, split: str) -> np.ndarray:
    return TokenShards(folder, split).all_tokens()


def test_tiny_shards_hold_the_same_tokens_as_one_shard(tmp_path):
    _write_pinned_folder(tmp_path / "src")
    one = prepare_data(DataConfig(source=str(tmp_path / "src"), vocab_size=300, val_fraction=0.2,
                                  out=str(tmp_path / "one")), log=lambda m: None)
    many = prepare_data(DataConfig(source=str(tmp_path / "src"), vocab_size=300, val_fraction=0.2, shard_tokens=777,
                                   out=str(tmp_path / "many")), log=lambda m: None)
    shards = json.loads((many / "manifest.json").read_text())["extra"]["shards"]
    assert len(shards["train"]) == -(-45368 // 777)  # cut every 777 tokens, mid-document too
    assert all((many / n).stat().st_size == 777 * 2 for n in shards["train"][:-1])
    for split in ("train", "val"):
        assert np.array_equal(_all_tokens(one, split), _all_tokens(many, split))


def test_an_interrupted_write_resumes_from_its_last_finished_shard(tmp_path, monkeypatch):
    _write_pinned_folder(tmp_path / "src")
    cfg = DataConfig(source=str(tmp_path / "src"), vocab_size=300, val_fraction=0.2, shard_tokens=5000)
    whole = prepare_data(cfg.replace(out=str(tmp_path / "whole")), log=lambda m: None)

    original = shards_module.ShardWriter._close
    closed = []

    def close_then_die(self, next_doc, skip):
        original(self, next_doc, skip)
        closed.append(self.name)
        if len(closed) == 3:
            raise KeyboardInterrupt  # as if the run were stopped after its third shard

    monkeypatch.setattr(shards_module.ShardWriter, "_close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg.replace(out=str(tmp_path / "resumed")), log=lambda m: None)
    assert (tmp_path / "resumed" / ".incomplete").exists()
    monkeypatch.setattr(shards_module.ShardWriter, "_close", original)
    monkeypatch.setattr(tokenize_module, "train_bpe", lambda *a, **k: pytest.fail("resume trained the tokenizer again"))
    messages = []
    resumed = prepare_data(cfg.replace(out=str(tmp_path / "resumed")), log=messages.append)
    assert any("3 train shard(s) done" in m for m in messages)
    names = json.loads((whole / "manifest.json").read_text())["files"]
    assert json.loads((resumed / "manifest.json").read_text())["files"] == names  # same files, same sha256
    assert not (resumed / ".incomplete").exists() and not (resumed / ".data-progress.json").exists()


def test_identical_files_are_read_once_in_combined_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.py").write_text("print('same')\n")
    (tmp_path / "b" / "copy.py").write_text("print('same')\n")
    (tmp_path / "b" / "other.py").write_text("print('other')\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a row"}) + "\n")
    docs, stats = read_documents(f"{tmp_path / 'a'},{tmp_path / 'b'},{rows}")
    assert [d.name for d in docs] == ["x.py", "other.py", "rows.jsonl:1"]  # the first in order wins
    assert stats.duplicates == 1 and stats.files == 4
    docs, stats = read_documents(str(tmp_path / "b"))  # one plain source: read as before, no dedup
    assert len(docs) == 2 and stats.duplicates == 0
    with pytest.raises(DataError, match="empty source between commas"):
        split_spec(f"{tmp_path / 'a'},,{rows}")
    out = prepare_data(DataConfig(source=f"{tmp_path / 'a'},{tmp_path / 'b'},{rows}", vocab_size=260,
                                  val_fraction=0.5, out=str(tmp_path / "out")), log=lambda m: None)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["duplicates"] == 1


class _FakeDist:
    def __init__(self, root: Path, name: str, files: dict[str, str]):
        self.metadata = {"Name": name}
        self._root = root
        self.files = [PurePosixPath(f) for f in files]
        for f, text in files.items():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text(text)

    def locate_file(self, path):
        return self._root / str(path)


@pytest.fixture
def fake_site_packages(tmp_path, monkeypatch):
    """20 fake distributions of 3 modules each, one vendoring another's file, plus tests
    folders and non-Python files that @site-packages leaves out."""
    root = tmp_path / "site-packages"
    dists = []
    for i in range(20):
        files = {f"pkg_{i}/m{j}.py": f"def f_{i}_{j}():\n    return {i * 10 + j}\n" for j in range(3)}
        files[f"pkg_{i}/tests/test_x.py"] = "assert True\n"
        files[f"pkg_{i}/data.json"] = "{}\n"
        dists.append(_FakeDist(root, f"Pkg_{i}", files))
    dists.append(_FakeDist(root, "vendoring", {"vendoring/_vendor/m0.py": "def f_3_0():\n    return 30\n"}))
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    return root


def test_site_packages_holds_out_whole_packages_deterministically(fake_site_packages):
    files = site_packages_files()
    assert len(files) == 61 and not any("/tests/" in name for name, _, _ in files)
    assert files[0][2] == "pkg-0"  # PEP 503 names: one spelling per distribution
    docs, stats = read_documents(SITE_PACKAGES)
    assert stats.duplicates == 1 and stats.packages == 20 and len(docs) == 60  # the vendored copy is gone
    train, val = split_documents(docs, 0.3)
    val_packages = {d.package for d in val}
    assert val_packages and not val_packages & {d.package for d in train}  # packages never straddle
    # Packages in the order of their name's hash, each kept while it fits 30% of the text.
    sizes = {}
    for d in docs:
        sizes[d.package] = sizes.get(d.package, 0) + len(d.text)
    expected, held = set(), 0
    for package in sorted(sizes, key=hash_score):
        if held + sizes[package] <= 0.3 * sum(sizes.values()):
            expected.add(package)
            held += sizes[package]
    assert val_packages == expected
    assert 0.2 < sum(len(d.text) for d in val) / sum(sizes.values()) <= 0.3
    _, val_again = split_documents(list(reversed(docs)), 0.3)
    assert {d.name for d in val_again} == {d.name for d in val}


def test_site_packages_tokenize_reports_packages_and_duplicates(fake_site_packages, tmp_path):
    out = prepare_data(DataConfig(source=SITE_PACKAGES, vocab_size=280, val_fraction=0.3, out=str(tmp_path / "out")),
                       log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["metrics"]["packages"], m["metrics"]["duplicates"], m["metrics"]["documents"]) == (20, 1, 60)
    assert all(name.startswith("pkg_") for name in m["extra"]["val_documents"])


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first row", None, "  ", "third row"], "n": [1, 2, 3, 4]}),
                   tmp_path / "rows.parquet")
    docs, _ = read_documents(str(tmp_path / "rows.parquet"))
    assert [(d.name, d.text) for d in docs] == [("rows.parquet:1", "first row"), ("rows.parquet:4", "third row")]
    with pytest.raises(DataError, match="has no 'body' column"):
        read_documents(str(tmp_path / "rows.parquet"), text_field="body")


def test_parquet_without_pyarrow_and_hub_without_datasets_name_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "datasets"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_documents(str(tmp_path / "rows.parquet"))
    with pytest.raises(DataError, match="pip install datasets"):
        list(iter_documents("hf:someone/corpus:train:content"))
    with pytest.raises(DataError, match="malformed"):
        list(iter_documents("hf:someone/corpus:a:b:c"))


def test_one_huge_package_does_not_swallow_the_split():
    """A package larger than the validation budget stays in training; smaller ones fill it."""
    from compactgpt.data import package_held_out

    packages = ["huge"] + [f"p{i}" for i in range(19)]
    lengths = [1000] + [10] * 19
    names = [hash_score(str(i)) for i in range(20)]
    val = package_held_out(packages, lengths, names, 0.05)
    assert not val[0] and 0 < sum(n for n, v in zip(lengths, val) if v) <= 0.05 * sum(lengths)


# ---------------------------------------------------------------------------------------
# Files that are not text


def _shared_object() -> Path:
    """A real compiled library of this interpreter (a .so on Linux, a .pyd on Windows)."""
    import _ctypes

    return Path(_ctypes.__file__)


def test_not_text_is_told_from_text_with_a_few_bad_bytes():
    from compactgpt.corpus import not_text

    assert not_text(_shared_object().read_bytes()) is not None
    assert "NUL" in not_text(b"text\0more text")
    assert "not UTF-8" in not_text(bytes(range(128, 256)) * 8)  # binary without a NUL byte
    assert not_text("plain text, é and ü\n".encode() * 100) is None
    assert not_text("Latin-1 prose: café, naïve, Köln\n".encode("latin-1") * 100) is None  # a few bad bytes
    assert not_text(b"") is None


def test_a_binary_file_given_is_refused_in_one_line(tmp_path, capsys):
    from compactgpt.app.cli import main

    lib = tmp_path / "lib.so"
    lib.write_bytes(_shared_object().read_bytes())
    with pytest.raises(DataError, match=f"{lib} is not a text file"):
        read_documents(str(lib))
    code = main(["tokenize", "--data", str(lib), "--out", str(tmp_path / "out"), "--vocab-size", "260"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {lib} is not a text file") and "pass a UTF-8 text file" in line
    assert not (tmp_path / "out").exists()


def test_binary_files_among_many_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    plain, _ = read_documents(str(src))
    (src / "lib.so").write_bytes(_shared_object().read_bytes())
    (src / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(200))  # a text suffix, binary bytes
    for spec, skipped in ((str(src), 1), (str(src / "*"), 2)):  # a folder lists text suffixes only; a glob all
        docs, stats = read_documents(spec)
        assert [(d.name.rsplit("/", 1)[-1], d.text) for d in docs] == [(d.name, d.text) for d in plain]
        assert stats.not_text == skipped and stats.files == 6
    messages = []
    prepare_data(DataConfig(source=str(src / "*"), vocab_size=260, val_fraction=0.5, out=str(tmp_path / "out")),
                 log=messages.append)
    assert any("skipped 2 file(s)" in m and "not text" in m for m in messages)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"is empty: 0 file\(s\) read \(1 more skipped as not text\)"):
        read_documents(str(tmp_path / "bin"))


def test_the_default_corpora_hold_no_file_taken_for_binary():
    # Every @stdlib and @site-packages file is read as text, as before the check existed: the
    # default pipeline's documents (and so its tokens) do not change.
    from compactgpt.corpus import _SNIFF_BYTES, STDLIB, not_text, source_files

    for spec in (STDLIB, SITE_PACKAGES):
        for name, path, _ in source_files(spec):
            with open(path, "rb") as f:
                assert not_text(f.read(_SNIFF_BYTES)) is None, name
