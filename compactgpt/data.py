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

import hashlib
import json
import math
import os
import queue
import resource
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .artifacts import INCOMPLETE, begin_write, finish_write, read_manifest
from .config import StageConfig, option
from .corpus import (HUB_PREFIX, SITE_PACKAGES, STDLIB, TEXT_SUFFIXES, Document, ReadStats,  # noqa: F401 (re-exported)
                     decode_text, empty_corpus, iter_documents, read_documents, source_fingerprint, stdlib_root)
from .errors import ConfigError, DataError
from .io import atomic_write_json
from .outputs import claim_output
from .progress import progress_bar
from .tokenizer import Tokenizer, train_bpe

STAGE = "data"  # the stage name in a data folder's manifest


def _score(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def unit_score(doc: Document) -> float:
    """Where a document falls in [0, 1) for the split: the hash of its package when it has one
    (a package is held out whole, so validation measures code the model never saw a file of),
    else of its name."""
    return _score(doc.package if doc.package is not None else doc.name)


def package_held_out(packages: list[str | None], lengths, name_scores, val_fraction: float) -> np.ndarray:
    """Whole packages held out for validation, about val_fraction of the packaged text: the
    packages taken in the order of their name's hash, each one kept if it still fits the
    budget (so one huge package never swallows the split, and a few dozen packages still give
    a validation set of the size asked for). Documents without a package split by name."""
    sizes: dict[str, int] = {}
    for package, n in zip(packages, lengths):
        if package is not None:
            sizes[package] = sizes.get(package, 0) + int(n)
    budget, held, chosen = val_fraction * sum(sizes.values()), 0, set()
    for package in sorted(sizes, key=_score):
        if held + sizes[package] <= budget:
            chosen.add(package)
            held += sizes[package]
    return np.array([p in chosen if p is not None else s < val_fraction
                     for p, s in zip(packages, name_scores)], dtype=bool)


def held_out_mask(unit_scores, name_scores, val_fraction: float, packages: list[str | None] | None = None,
                  lengths=None) -> np.ndarray:
    """Which documents go to validation: whole packages by their share of the text when the
    documents have packages (package_held_out), else unit score below val_fraction; with at
    least one document on each side (the lowest-scoring unit joins validation, the highest
    stays in training). When packages cannot give both sides (one package), names decide."""
    if packages is not None and lengths is not None and any(p is not None for p in packages):
        val = package_held_out(packages, lengths, name_scores, val_fraction)
        if 0 < val.sum() < len(val):
            return val
    for scores in (np.asarray(unit_scores, np.float64), np.asarray(name_scores, np.float64)):
        val = scores < val_fraction
        if not val.any():
            val = scores == scores.min()
        if val.all():
            val &= scores != scores.max()
        if 0 < val.sum() < len(val):
            return val
    val = np.zeros(len(name_scores), dtype=bool)  # every name the same: hold out the first lowest
    val[int(np.argmin(name_scores))] = True
    return val


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split: a document is held out when the hash of its name (of its package,
    when it has one) falls below val_fraction. At least one document lands on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(docs) == 1:
        return _split_single(docs[0], val_fraction)
    val = held_out_mask([unit_score(d) for d in docs], [_score(d.name) for d in docs], val_fraction,
                        [d.package for d in docs], [len(d.text) for d in docs])
    return [d for d, v in zip(docs, val) if not v], [d for d, v in zip(docs, val) if v]


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

    source: str = option(STDLIB, "text file, folder, glob, JSONL or Parquet file, @stdlib (the Python standard library's sources), @site-packages (installed packages' sources), hf:owner/name[:split[:column]], or several joined by commas")
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


# The tokenizer trains on every training document up to this many characters; past it, on a
# deterministic sample of about this size: BPE merges settle long before 100M characters, and
# training time and memory grow with the text it counts.
TOKENIZER_SAMPLE_CHARS = 100_000_000
_BATCH_CHARS = 4_000_000  # text handed to the (multi-threaded) encoder at once: bounds memory
_BATCH_DOCS = 256
_STATE = ".data-progress.json"  # inside the folder being written: which shards are finished
_MAX_VAL_NAMES = 10000


@dataclass
class _Plan:
    """What the first pass over a source learned: counts, and which documents are held out.
    Documents are not kept (one-document sources excepted): each later pass reads them again."""

    spec: str
    text_field: str
    stats: ReadStats
    val: np.ndarray  # per document, in read order: held out?
    train_chars: int
    single: tuple[list[Document], list[Document]] | None = None  # a one-document source, split by lines

    def documents(self, split: str) -> Iterator[Document]:
        if self.single is not None:
            yield from self.single[split == "val"]
            return
        want = split == "val"
        for i, doc in enumerate(iter_documents(self.spec, self.text_field)):
            if i < len(self.val) and self.val[i] == want:
                yield doc


def _plan(config: DataConfig, log) -> _Plan:
    stats = ReadStats()
    units, names, lengths, first, packages = array("d"), array("d"), array("q"), [], []
    bar = progress_bar(desc="read", unit="doc")
    for doc in iter_documents(config.source, config.text_field, stats):
        units.append(unit_score(doc))
        names.append(_score(doc.name))
        lengths.append(len(doc.text))
        packages.append(doc.package)
        if len(first) < 2:
            first.append(doc)
        bar.update(1)
    bar.close()
    if not lengths:
        raise empty_corpus(config.source, stats)
    if stats.replaced_bytes:
        log(f"warning: {stats.replaced_bytes} undecodable byte(s) in {stats.files_with_replacements} "
            f"file(s) of {config.source} were replaced with U+FFFD; re-encode those files as UTF-8 "
            "to keep them intact")
    if len(lengths) == 1:
        train, val = split_documents(first, config.val_fraction)
        return _Plan(config.source, config.text_field, stats, np.zeros(0, bool), len(train[0].text), (train, val))
    if not 0.0 < config.val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {config.val_fraction}")
    val = held_out_mask(units, names, config.val_fraction, packages, lengths)
    train_chars = int(np.asarray(lengths, np.int64)[~val].sum())
    return _Plan(config.source, config.text_field, stats, val, train_chars)


def _tokenizer_texts(plan: _Plan, log) -> Iterator[str]:
    """The training documents the tokenizer learns from: all of them up to
    TOKENIZER_SAMPLE_CHARS, else a sample drawn by a salted hash of the name (the salt keeps
    the sample independent of the split, which hashes the same names)."""
    rate = TOKENIZER_SAMPLE_CHARS / max(plan.train_chars, 1)
    if rate < 1:
        log(f"training the tokenizer on a ~{rate:.0%} sample of {plan.train_chars:,} training characters")
    for doc in plan.documents("train"):
        if rate >= 1 or _score("tokenizer-sample:" + doc.name) < rate:
            yield doc.text


def _prefetched(items: Iterator, depth: int = 4) -> Iterator:
    """items, produced by a background thread: reading and decoding files overlaps with the
    encoder, which releases the GIL."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class _State:
    """The resume record of an unfinished data folder: per split, its finished shards and
    where the next one starts (document index, tokens of it already written). Valid only for
    the same settings, source and tokenizer (the key)."""

    def __init__(self, out: Path, key: str):
        self.path = out / _STATE
        self.data = {"key": key, "splits": {}}
        if (out / INCOMPLETE).exists():
            try:
                found = json.loads(self.path.read_text(encoding="utf-8"))
                if found.get("key") == key:
                    self.data = found
            except (OSError, ValueError, AttributeError):
                pass
        self.resumed = bool(self.data["splits"])

    def split(self, name: str) -> dict:
        return self.data["splits"].setdefault(name, {"shards": [], "next_doc": 0, "skip": 0, "done": False,
                                                     "names": []})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


class _ShardWriter:
    """Appends tokens to `{split}_{k:03d}.bin`, a new shard every shard_tokens tokens (cut
    mid-document, as a single concatenation would be); each finished shard is fsynced, renamed
    into place and recorded in the state, so memory stays bounded and a rerun resumes."""

    def __init__(self, out: Path, split: str, shard_tokens: int, state: _State, log):
        self.out, self.split, self.shard_tokens, self.state, self.log = out, split, shard_tokens, state, log
        self.progress = state.split(split)
        self.file = None
        self.filled = 0
        self.started = time.monotonic()

    def _open(self) -> None:
        self.name = f"{self.split}_{len(self.progress['shards']):03d}.bin"
        self.part = self.out / f".{self.name}.part.tmp"  # a stray one is removed by begin_write
        self.file = open(self.part, "wb")

    def add(self, tokens: np.ndarray, doc: int, skip: int) -> None:
        """tokens of document `doc`, from its token `skip` on."""
        pos = 0
        while pos < len(tokens):
            if self.file is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self.filled)
            tokens[pos:pos + take].tofile(self.file)
            pos += take
            self.filled += take
            if self.filled == self.shard_tokens:
                self._close(*((doc, skip + pos) if pos < len(tokens) else (doc + 1, 0)))

    def _close(self, next_doc: int, skip: int) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self.part, self.out / self.name)
        self.progress["shards"].append(self.name)
        self.progress.update(next_doc=next_doc, skip=skip)
        self.state.save()
        rate = self.filled / max(time.monotonic() - self.started, 1e-9)
        self.log(f"{self.name}: {self.filled:,} tokens ({rate:,.0f} tokens/s)")
        self.started = time.monotonic()
        self.filled = 0

    def finish(self, n_docs: int) -> None:
        if self.file is None and not self.progress["shards"]:
            self._open()  # an empty split still gets its one (empty) shard
        if self.file is not None:
            self._close(n_docs, 0)
        self.progress["done"] = True
        self.state.save()


def _encode_split(plan: _Plan, split: str, tokenizer: Tokenizer, writer: _ShardWriter) -> None:
    """Encode one split's documents in batches and append them to its shards, from where an
    interrupted run stopped (documents before it are read again but not encoded)."""
    progress = writer.progress
    if progress["done"]:
        return
    start, skip = progress["next_doc"], progress["skip"]
    names = progress["names"] = progress["names"][:start]  # validation names, for the manifest
    dtype = token_dtype(tokenizer.vocab_size)
    bar = progress_bar(desc=f"encode {split}", unit="tok")

    def encode(batch: list[tuple[int, Document]]) -> None:
        for (i, _), ids in zip(batch, tokenizer.encode_batch([d.text for _, d in batch])):
            ids.append(tokenizer.eot_id)
            offset = skip if i == start else 0
            writer.add(np.asarray(ids[offset:], dtype=dtype), i, offset)
            bar.update(len(ids) - offset)

    batch, chars, n = [], 0, 0
    for n, doc in enumerate(_prefetched(plan.documents(split)), start=1):
        i = n - 1
        if i < start:
            continue
        if split == "val" and len(names) < _MAX_VAL_NAMES:
            names.append(doc.name)
        batch.append((i, doc))
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            encode(batch)
            batch, chars = [], 0
    encode(batch)
    bar.close()
    writer.finish(n)


def _shard_tokens(out: Path, names: list[str], dtype: np.dtype) -> int:
    return sum((out / n).stat().st_size // dtype.itemsize for n in names)


def _unigram_from_shards(out: Path, shards: dict[str, list[str]], dtype: np.dtype, vocab_size: int,
                         chunk: int = 1 << 24) -> float:
    """unigram_perplexity of the written shards, read back in chunks (memory bounded); the
    integer counts are exact, and a validation split that fits one chunk is averaged exactly
    as unigram_perplexity does."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for name in shards["train"]:
        tokens = np.memmap(out / name, dtype=dtype, mode="r") if (out / name).stat().st_size else np.zeros(0, dtype)
        for s in range(0, len(tokens), chunk):
            counts += np.bincount(np.asarray(tokens[s:s + chunk], dtype=np.int64), minlength=vocab_size)
    logp = np.log((counts.astype(np.float64) + 1.0) / (counts.astype(np.float64) + 1.0).sum())
    n_val = _shard_tokens(out, shards["val"], dtype)
    if n_val <= chunk:
        val = np.concatenate([np.fromfile(out / name, dtype=dtype) for name in shards["val"]])
        return float(math.exp(-logp[val.astype(np.int64)].mean()))
    total = 0.0
    for name in shards["val"]:
        tokens = np.memmap(out / name, dtype=dtype, mode="r")
        for s in range(0, len(tokens), chunk):
            total += float(logp[np.asarray(tokens[s:s + chunk], dtype=np.int64)].sum())
    return float(math.exp(-total / n_val))


def _state_key(config: DataConfig, tokenizer: Tokenizer | None) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(source_fingerprint(config.source).encode())
    h.update(tokenizer.to_json().encode() if tokenizer is not None else b"trained here")
    return h.hexdigest()


def _prepare(config: DataConfig, out: Path, tokenizer: Tokenizer | None, log) -> Path:
    started = time.monotonic()
    plan = _plan(config, log)
    state = _State(out, _state_key(config, tokenizer))
    if state.resumed and tokenizer is None:
        tokenizer = Tokenizer.from_folder(out)  # the one trained before the interruption
    if state.resumed:
        log(f"resuming the unfinished write in {out}: " + ", ".join(
            f"{len(v['shards'])} {k} shard(s) done" for k, v in state.data["splits"].items()))
    elif tokenizer is None:
        tokenizer = train_bpe(_tokenizer_texts(plan, log), config.vocab_size)
    begin_write(out, STAGE)
    if not state.resumed:
        tokenizer.save(out)
        state.save()  # from here on, a rerun resumes instead of training the tokenizer again
    for split in ("train", "val"):
        _encode_split(plan, split, tokenizer, _ShardWriter(out, split, config.shard_tokens, state, log))
    dtype = token_dtype(tokenizer.vocab_size)
    shards = {split: state.split(split)["shards"] for split in ("train", "val")}
    stats = plan.stats
    train_tokens, val_tokens = _shard_tokens(out, shards["train"], dtype), _shard_tokens(out, shards["val"], dtype)
    n_val = len(plan.single[1]) if plan.single else int(plan.val.sum())
    seconds = time.monotonic() - started
    metrics = {
        "files": stats.files,
        "documents": stats.documents,
        "train_documents": stats.documents - n_val if not plan.single else 1,
        "val_documents": n_val,
        "characters": stats.characters,
        "replaced_bytes": stats.replaced_bytes,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "vocab_size": tokenizer.vocab_size,
        "unigram_val_perplexity": _unigram_from_shards(out, shards, dtype, tokenizer.vocab_size),
        "duplicates": stats.duplicates,
        "packages": stats.packages,
        "seconds": round(seconds, 2),
        "tokens_per_second": round((train_tokens + val_tokens) / max(seconds, 1e-9)),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
    }
    extra = {
        "dtype": dtype.name,
        "shards": shards,
        "source_fingerprint": source_fingerprint(config.source),
        "val_documents": state.split("val")["names"][:_MAX_VAL_NAMES],
    }
    files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *shards["train"], *shards["val"]]
    finish_write(out, STAGE, config.to_dict(), metrics=metrics, files=files, extra=extra)
    (out / _STATE).unlink(missing_ok=True)
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
