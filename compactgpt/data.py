"""Text -> documents -> token shards, and random windows read back through memmap.

Sources: a text file, a folder (searched recursively for text files), a glob, a JSONL file
(one document per line, in a text field), or `@stdlib`, the embedded default corpus: the
Python standard library's own source files of the running interpreter (present on every
machine, no download). Documents are split into train and validation *by document*, by a
hash of the document's name, so the split does not depend on file order or on which other
files are present. A source that is a single document is split at a line boundary instead:
its tail is held out.

A prepared data folder holds the tokenizer, `train_000.bin`... and `val_000.bin`... (raw
uint16 when the vocabulary fits, else uint32, `<|endoftext|>` after every document), and a
manifest with the counts.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .artifacts import begin_write, finish_write, read_manifest
from .config import StageConfig, option
from .errors import ConfigError, DataError
from .io import atomic_write
from .outputs import claim_output
from .tokenizer import Tokenizer, train_bpe

STDLIB = "@stdlib"
STAGE = "data"  # the stage name in a data folder's manifest
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".pyi", ".jsonl", ".c", ".h", ".js", ".ts",
                 ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".html", ".css", ".tex"}
# Standard library folders left out of the default corpus: test suites (huge, repetitive),
# installed third-party packages, and demo/tool folders that are not library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                "__pycache__", "lib2to3", "ensurepip", "pydoc_data"}
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class Document:
    name: str  # stable identifier: relative path, or path:line for JSONL
    text: str


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    characters: int = 0
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    files_with_replacements: int = 0


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 decode; undecodable bytes become U+FFFD. Returns the text and how many bytes."""
    text = data.decode("utf-8", errors="surrogateescape")
    text, bad = _SURROGATE.subn("\ufffd", text)
    return text, bad


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(("config-", ".")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(((rel / f).as_posix(), Path(dirpath) / f))
    return out


def _source_files(spec: str) -> list[tuple[str, Path]]:
    """(stable name, path) for every file a source spec names."""
    if spec == STDLIB:
        return _stdlib_files()
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in _glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"the glob {spec!r} matches no files; check the pattern and the current folder")
        return [(p.as_posix(), p) for p in matches]
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix.lower() in TEXT_SUFFIXES and not f.startswith("."):
                    found.append((p.relative_to(path).as_posix(), p))
        if not found:
            raise DataError(
                f"the folder {spec} holds no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))}); "
                "point --data at a text file, a folder of text files, a glob or a JSONL file"
            )
        return found
    raise DataError(f"the data path {spec} does not exist; pass a text file, folder, glob, JSONL file or {STDLIB}")


def read_documents(spec: str | None, text_field: str = "text") -> tuple[list[Document], ReadStats]:
    """All documents of a source, in a stable order, with counts of what was read."""
    spec = spec or STDLIB
    stats = ReadStats()
    docs: list[Document] = []
    for name, path in _source_files(spec):
        text, bad = decode_text(path.read_bytes())
        stats.files += 1
        if bad:
            stats.replaced_bytes += bad
            stats.files_with_replacements += 1
        if path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(name, path, text, text_field))
        elif text.strip():
            docs.append(Document(name, text))
    if not docs:
        raise DataError(
            f"the corpus {spec} is empty: {stats.files} file(s) read, no text in them; "
            "pass files that contain text"
        )
    stats.documents = len(docs)
    stats.characters = sum(len(d.text) for d in docs)
    return docs, stats


def _jsonl_documents(name: str, path: Path, text: str, field: str) -> Iterable[Document]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from e
        if not isinstance(row, dict) or field not in row:
            raise DataError(
                f"{path}:{lineno} has no {field!r} field; pass --text-field with the field that "
                "holds the text"
            )
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(row[field]).__name__}, not text")
        if row[field].strip():
            yield Document(f"{name}:{lineno}", row[field])


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split: a document is held out when the hash of its name falls below
    val_fraction. At least one document lands on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(docs) == 1:
        return _split_single(docs[0], val_fraction)

    def score(d: Document) -> float:
        return int.from_bytes(hashlib.sha256(d.name.encode()).digest()[:8], "big") / 2**64

    val = [d for d in docs if score(d) < val_fraction]
    if not val:
        val = [min(docs, key=score)]
    if len(val) == len(docs):
        val.remove(max(val, key=score))
    held = {id(d) for d in val}
    return [d for d in docs if id(d) not in held], val


def _split_single(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise DataError(
            f"the corpus is a single line ({len(doc.text)} characters): there is nothing to hold out "
            "for validation; give more text, or several documents"
        )
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - val_fraction))))
    return [Document(doc.name + "#train", "".join(lines[:cut]))], [Document(doc.name + "#val", "".join(lines[cut:]))]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(docs: list[Document], tokenizer: Tokenizer, batch: int = 256) -> np.ndarray:
    """Token ids of the documents, each followed by <|endoftext|>."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    for i in range(0, len(docs), batch):
        for ids in tokenizer.encode_batch([d.text for d in docs[i : i + batch]]):
            ids.append(tokenizer.eot_id)
            parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the validation tokens under the training tokens' unigram frequencies
    (add-one smoothed): the level a model that ignores context reaches."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val.astype(np.int64)].mean()))


# ---------------------------------------------------------------------------------------
# Prepared data folders


@dataclass
class DataConfig(StageConfig):
    """Settings of the data stage; saved in the data folder's manifest."""

    source: str = option(STDLIB, "text file, folder, glob, JSONL file or @stdlib (the Python standard library's sources)")
    vocab_size: int = option(8192, "BPE vocabulary size, <|endoftext|> included")
    val_fraction: float = option(0.05, "share of documents held out for validation")
    text_field: str = option("text", "JSONL field holding the text")
    shard_tokens: int = option(1 << 26, "tokens per shard file", flag=False)

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive): both splits need documents; "
                              f"got {self.val_fraction}")
        if self.vocab_size < 1 or self.shard_tokens < 1:
            raise ConfigError(f"vocab_size and shard_tokens must be positive, got {self.vocab_size}, "
                              f"{self.shard_tokens}")


def source_fingerprint(spec: str) -> str:
    """Cheap identity of a source: names, sizes and modification times of its files."""
    h = hashlib.sha256()
    if spec == STDLIB:
        h.update(sys.version.encode())
    for name, path in _source_files(spec):
        st = path.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_data(config: DataConfig, out: str | Path, tokenizer: Tokenizer | None = None, log=print, *,
                 overwrite: bool = False, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Read, split, train a tokenizer (unless one is given), encode and write shards.

    out is claimed first (compactgpt.outputs.claim_output): ConfigError when it is the source or
    one of `inputs` (flag -> path, e.g. the folder the tokenizer came from) or a folder above
    one, is not a writable folder, is being written by another run, or holds another artifact
    and overwrite is False."""
    out = Path(out)
    with claim_output(out, stage=STAGE, inputs={"--data": config.source, **(inputs or {})}, overwrite=overwrite):
        return _prepare(config, out, tokenizer, log)


def _prepare(config: DataConfig, out: Path, tokenizer: Tokenizer | None, log) -> Path:
    docs, stats = read_documents(config.source, config.text_field)
    if stats.replaced_bytes:
        log(
            f"warning: {stats.replaced_bytes} undecodable byte(s) in {stats.files_with_replacements} "
            f"file(s) of {config.source} were replaced with U+FFFD; re-encode those files as UTF-8 "
            "to keep them intact"
        )
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    if tokenizer is None:
        tokenizer = train_bpe((d.text for d in train_docs), config.vocab_size)
    train = encode_documents(train_docs, tokenizer)
    val = encode_documents(val_docs, tokenizer)
    begin_write(out, STAGE)
    tokenizer.save(out)
    files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    shards = {}
    for split, tokens in (("train", train), ("val", val)):
        shards[split] = []
        for k, start in enumerate(range(0, max(len(tokens), 1), config.shard_tokens)):
            name = f"{split}_{k:03d}.bin"
            chunk = tokens[start : start + config.shard_tokens]
            atomic_write(out / name, lambda p, c=chunk: c.tofile(p))
            shards[split].append(name)
            files.append(name)
    metrics = {
        "files": stats.files,
        "documents": stats.documents,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "characters": stats.characters,
        "replaced_bytes": stats.replaced_bytes,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "vocab_size": tokenizer.vocab_size,
        "unigram_val_perplexity": unigram_perplexity(train, val, tokenizer.vocab_size),
    }
    extra = {
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shards": shards,
        "source_fingerprint": source_fingerprint(config.source),
        "val_documents": [d.name for d in val_docs][:10000],
    }
    finish_write(out, STAGE, config.to_dict(), metrics=metrics, files=files, extra=extra)
    return out


def is_data_folder(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "manifest.json").is_file():
        return False
    m = read_manifest(path)
    return m is not None and m.stage == "data"


def prepared_matches(folder: Path, config: DataConfig) -> bool:
    """True when folder holds data prepared with these settings from the unchanged source."""
    try:
        if not is_data_folder(folder):
            return False
        m = read_manifest(folder)
    except Exception:
        return False
    return m.settings == config.to_dict() and m.extra.get("source_fingerprint") == source_fingerprint(config.source)


class TokenShards:
    """One split of a prepared data folder, memory-mapped, sampled in random windows."""

    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None or manifest.stage != "data":
            raise DataError(f"{folder} is not a prepared data folder; create one with `compactgpt tokenize`")
        dtype = np.dtype(manifest.extra["dtype"])
        self.shards = [np.memmap(folder / n, dtype=dtype, mode="r") for n in manifest.extra["shards"][split]]
        self.shards = [s for s in self.shards if len(s)]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.n_tokens = int(self.lengths.sum())
        self.split = split
        self.folder = folder

    def check_window(self, block_size: int) -> None:
        if not self.shards or self.lengths.max() < block_size + 1:
            raise DataError(
                f"the {self.split} split of {self.folder} has {self.n_tokens} tokens, fewer than one "
                f"window of {block_size + 1}; use more text or a shorter --block-size"
            )

    def sample(self, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, block_size), y shifted one token; positions drawn with
        `generator`, so a saved generator state reproduces the batches exactly."""
        usable = np.maximum(self.lengths - block_size, 0)
        starts = torch.randint(0, int(usable.sum()), (batch_size,), generator=generator).numpy()
        bounds = np.cumsum(usable)
        rows = []
        for s in starts:
            shard = int(np.searchsorted(bounds, s, side="right"))
            offset = int(s - (bounds[shard - 1] if shard else 0))
            rows.append(np.asarray(self.shards[shard][offset : offset + block_size + 1], dtype=np.int64))
        chunk = torch.from_numpy(np.stack(rows))
        return chunk[:, :-1], chunk[:, 1:]

    def fixed_windows(self, n: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n windows spread evenly over the split: the same every time (validation)."""
        self.check_window(block_size)
        out = []
        per_shard = max(1, n // len(self.shards))
        for shard in self.shards:
            last = len(shard) - block_size - 1
            if last < 0:
                continue
            for start in np.linspace(0, last, num=per_shard, dtype=np.int64):
                chunk = torch.from_numpy(np.asarray(shard[start : start + block_size + 1], dtype=np.int64))
                out.append((chunk[None, :-1], chunk[None, 1:]))
        return out[:n]

    def validation_batches(self, n: int, block_size: int, group: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """fixed_windows(n, block_size) stacked `group` at a time: the same validation batches
        at every evaluation of a training stage."""
        windows = self.fixed_windows(n, block_size)
        return [(torch.cat([x for x, _ in windows[i:i + group]]), torch.cat([y for _, y in windows[i:i + group]]))
                for i in range(0, len(windows), group)]

    def all_tokens(self) -> np.ndarray:
        return np.concatenate([np.asarray(s) for s in self.shards]) if self.shards else np.zeros(0, np.int64)


def random_windows(tokens: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n windows of `length` consecutive tokens at uniformly random starts, (n, length); the
    same generator state draws the same windows."""
    starts = torch.randint(0, max(1, len(tokens) - length), (n,), generator=generator)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])
