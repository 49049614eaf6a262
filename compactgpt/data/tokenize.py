"""The tokenize stage (prepare_data): text -> documents -> a tokenizer and token shards in a data
folder, with a manifest of the counts. An interrupted write resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
import queue
import resource
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..artifacts import begin_write, finish_write, read_manifest
from ..config import StageConfig, open_fraction, option, positive_int, run_option
from ..corpus import STDLIB, Document, ReadStats, empty_corpus, iter_documents, source_fingerprint
from ..errors import ConfigError, DataError
from ..outputs import claim_output
from ..progress import progress_bar
from ..tokenizer import Tokenizer, train_bpe
from .shards import STAGE, STATE_FILE, ShardState, ShardWriter, count_tokens, is_data_folder, token_dtype
from .split import hash_score, held_out_mask, split_documents, unit_score


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


@dataclass
class DataConfig(StageConfig):
    """Settings of the tokenize stage. Those that decide what it writes are saved in the data
    folder's manifest; where it writes, whose tokenizer it reuses and whether it may replace an
    artifact are not (saved=False), so they change neither the manifest nor a fingerprint."""

    source: str = option(STDLIB, "text file, folder, glob, JSONL or Parquet file, @stdlib (the Python standard "
                         "library's sources), @site-packages (installed packages' sources, whole packages held "
                         "out), hf:owner/name[:split[:column]], or several joined by commas (files then "
                         "deduplicated by content)")
    vocab_size: int = option(8192, "BPE vocabulary size, <|endoftext|> included", parse=positive_int)
    val_fraction: float = option(0.05, "share of documents held out for validation, between 0 and 1",
                                 parse=open_fraction)
    text_field: str = option("text", "JSONL field / Parquet column holding the text")
    shard_tokens: int = option(1 << 26, "tokens per shard file", flag=False)
    out: str = option("", "data folder to write (an interrupted write resumes)", saved=False)
    tokenizer: str | None = option(None, "use the tokenizer of this model or data folder instead of training one",
                                   saved=False)
    overwrite: bool = run_option("overwrite")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive): both splits need documents; "
                              f"got {self.val_fraction}")
        if self.vocab_size < 1 or self.shard_tokens < 1:
            raise ConfigError(f"vocab_size and shard_tokens must be positive, got {self.vocab_size}, "
                              f"{self.shard_tokens}")


def prepare_data(config: DataConfig, log: Callable[[str], None] = print) -> Path:
    """Read config.source, split it, train a tokenizer (or reuse config.tokenizer's), encode
    and write the shards into config.out; returns that folder.

    The folder is claimed first (compactgpt.outputs.claim_output): ConfigError when it is the
    source or the tokenizer's folder or a folder above one, is not a writable folder, is being
    written by another run, or holds another artifact and config.overwrite is False; also
    when config.out is empty."""
    if not config.out:
        raise ConfigError("no data folder to write: set DataConfig.out (--out)")
    out = Path(config.out)
    tokenizer = Tokenizer.from_folder(config.tokenizer) if config.tokenizer else None
    inputs = {"--data": config.source, "--tokenizer": config.tokenizer}
    with claim_output(out, stage=STAGE, inputs=inputs, overwrite=config.overwrite):
        return _prepare(config, out, tokenizer, log)


# The tokenizer trains on every training document up to this many characters; past it, on a
# deterministic sample of about this size: BPE merges settle long before 100M characters, and
# training time and memory grow with the text it counts.
TOKENIZER_SAMPLE_CHARS = 100_000_000
_BATCH_CHARS = 4_000_000  # text handed to the (multi-threaded) encoder at once: bounds memory
_BATCH_DOCS = 256
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
        names.append(hash_score(doc.name))
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
    if stats.not_text:
        log(f"warning: skipped {stats.not_text} file(s) of {config.source} that are not text (binary)")
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
        if rate >= 1 or hash_score("tokenizer-sample:" + doc.name) < rate:
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


def _encode_split(plan: _Plan, split: str, tokenizer: Tokenizer, writer: ShardWriter) -> None:
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
    n_val = count_tokens(out, shards["val"], dtype)
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
    state = ShardState(out, _state_key(config, tokenizer))
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
        _encode_split(plan, split, tokenizer, ShardWriter(out, split, config.shard_tokens, state, log))
    dtype = token_dtype(tokenizer.vocab_size)
    shards = {split: state.split(split)["shards"] for split in ("train", "val")}
    stats = plan.stats
    train_tokens, val_tokens = count_tokens(out, shards["train"], dtype), count_tokens(out, shards["val"], dtype)
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
    (out / STATE_FILE).unlink(missing_ok=True)
    return out


def prepared_matches(folder: Path, config: DataConfig) -> bool:
    """True when folder holds data prepared with these settings from the unchanged source."""
    try:
        if not is_data_folder(folder):
            return False
        m = read_manifest(folder)
    except Exception:
        return False
    return m.settings == config.to_dict() and m.extra.get("source_fingerprint") == source_fingerprint(config.source)
