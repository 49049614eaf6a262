"""Token shards: `train_000.bin`... and `val_000.bin`... (raw uint16 when the vocabulary fits,
else uint32, `<|endoftext|>` after every document), written a shard at a time with a resume
record, and read back through memmap as random or fixed windows."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import INCOMPLETE, read_manifest
from ..errors import DataError
from ..io import atomic_write_json


STAGE = "data"  # the stage name in a data folder's manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


STATE_FILE = ".data-progress.json"  # inside the folder being written: which shards are finished


class ShardState:
    """The resume record of an unfinished data folder: per split, its finished shards and
    where the next one starts (document index, tokens of it already written). Valid only for
    the same settings, source and tokenizer (the key)."""

    def __init__(self, out: Path, key: str):
        self.path = out / STATE_FILE
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


class ShardWriter:
    """Appends tokens to `{split}_{k:03d}.bin`, a new shard every shard_tokens tokens (cut
    mid-document, as a single concatenation would be); each finished shard is fsynced, renamed
    into place and recorded in the state, so memory stays bounded and a rerun resumes."""

    def __init__(self, out: Path, split: str, shard_tokens: int, state: ShardState, log):
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


def count_tokens(out: Path, names: list[str], dtype: np.dtype) -> int:
    """Tokens in the shard files `names` of folder out."""
    return sum((out / n).stat().st_size // dtype.itemsize for n in names)


def is_data_folder(path: str | Path) -> bool:
    """True when path is a finished data folder (its manifest names the data stage)."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        return False
    m = read_manifest(path)
    return m is not None and m.stage == "data"


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
