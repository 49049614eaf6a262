"""Corpus sources: which documents a `--data` spec names, read one at a time.

A spec is one source or several joined by commas (`@stdlib,@site-packages,notes/,rows.jsonl`):
- `@stdlib`: the Python standard library's own source files of the running interpreter;
- `@site-packages`: the `.py` files of every distribution installed in the running
  environment, each document tagged with its distribution (its *package*), so that whole
  packages can be held out for validation;
- a text file, a folder (searched recursively for text files) or a glob;
- a JSONL file (one document per line, in a text field) or a Parquet file (one per row, in a
  text column; needs pyarrow);
- `hf:owner/name[:split[:column]]`: a Hugging Face hub data set (needs `datasets`).

A file that is not text (a NUL byte in its first block, or mostly bytes that are not UTF-8
there: a library, an image, an archive) is refused when it is the file a spec names, and skipped
and counted when a folder or glob holds it. Text with a few undecodable bytes is read, those
bytes replaced with U+FFFD and counted.

Documents come out of `iter_documents` one at a time in a fixed order, so a corpus far larger
than memory streams through. Files are deduplicated by the sha256 of their bytes (the first in
order wins) for `@site-packages` and for combined specs, where vendored copies abound; a single
`@stdlib`, file, folder, glob or JSONL source is read exactly as before (the standard library
holds two identical pairs, and deduplicating them would change the default corpus's tokens).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError

STDLIB = "@stdlib"
SITE_PACKAGES = "@site-packages"
HUB_PREFIX = "hf:"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".pyi", ".jsonl", ".c", ".h", ".js", ".ts",
                 ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".html", ".css", ".tex"}
# Standard library folders left out of the default corpus: test suites (huge, repetitive),
# installed third-party packages, and demo/tool folders that are not library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                "__pycache__", "lib2to3", "ensurepip", "pydoc_data"}
# Test suites of installed packages are as repetitive as the standard library's.
_SITE_SKIP = {"test", "tests", "testing", "__pycache__"}
_SURROGATE = re.compile("[\udc80-\udcff]")
# The first bytes of a file decide whether it is text, as git and grep decide: a NUL byte there,
# or more than this share of bytes that are not UTF-8 (Latin-1 prose has a few per line at most).
_SNIFF_BYTES = 8192
_MAX_UNDECODABLE = 0.3


@dataclass
class Document:
    name: str  # stable identifier: relative path, or path:line for JSONL / Parquet rows
    text: str
    package: str | None = None  # the distribution of an @site-packages file: held out as a whole


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    characters: int = 0
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    files_with_replacements: int = 0
    duplicates: int = 0  # files skipped because an earlier file had the same bytes
    not_text: int = 0  # files of a folder or glob skipped as binary (see not_text)
    packages: int = 0  # distinct packages among the documents (@site-packages)


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 decode; undecodable bytes become U+FFFD. Returns the text and how many bytes."""
    text = data.decode("utf-8", errors="surrogateescape")
    text, bad = _SURROGATE.subn("\ufffd", text)
    return text, bad


def not_text(data: bytes) -> str | None:
    """Why a file's bytes are not text, or None when they are (see the module docstring)."""
    head = data[:_SNIFF_BYTES]
    if b"\0" in head:
        return "it holds NUL bytes"
    _, bad = decode_text(head)
    if bad > _MAX_UNDECODABLE * len(head):
        return f"{bad} of its first {len(head)} bytes are not UTF-8"
    return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_spec(spec: str) -> list[str]:
    """The sources of a spec: split at commas, unless the whole spec is an existing path."""
    if "," not in spec or Path(spec).expanduser().exists():
        return [spec]
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):
        raise DataError(f"the data spec {spec!r} has an empty source between commas; "
                        "join sources as A,B,C with no empty parts")
    return parts


def deduplicates(spec: str) -> bool:
    """Whether files of this spec are deduplicated by content (see the module docstring)."""
    parts = split_spec(spec)
    return len(parts) > 1 or parts[0] == SITE_PACKAGES


def _stdlib_files() -> list[tuple[str, Path, str | None]]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(("config-", ".")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(((rel / f).as_posix(), Path(dirpath) / f, None))
    return out


def _package_name(dist) -> str:
    name = dist.metadata["Name"] or Path(str(dist.locate_file(""))).name
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: one spelling per distribution


def site_packages_files(distributions: Iterable | None = None) -> list[tuple[str, Path, str | None]]:
    """(name, path, package) of the .py files of the installed distributions, sorted by name
    (the path below site-packages); a file two distributions list goes to the first in
    (name, package) order. Test folders and files outside site-packages are left out."""
    from importlib import metadata

    found: dict[str, tuple[Path, str]] = {}
    for dist in distributions if distributions is not None else metadata.distributions():
        package = _package_name(dist)
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if not str(f).endswith(".py") or ".." in parts or _SITE_SKIP.intersection(parts[:-1]):
                continue
            name = Path(str(f)).as_posix()
            if name not in found or package < found[name][1]:
                path = base / f
                if path.is_file():
                    found[name] = (path, package)
    return [(name, path, package) for name, (path, package) in sorted(found.items())]


def _files_of(spec: str) -> list[tuple[str, Path, str | None]]:
    """(stable name, path, package) for every file one source names."""
    if spec == STDLIB:
        return _stdlib_files()
    if spec == SITE_PACKAGES:
        return site_packages_files()
    path = Path(spec).expanduser()
    if _is_glob(spec):
        matches = sorted(Path(p) for p in _glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"the glob {spec!r} matches no files; check the pattern and the current folder")
        return [(p.as_posix(), p, None) for p in matches]
    if path.is_file():
        return [(path.name, path, None)]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix.lower() in TEXT_SUFFIXES and not f.startswith("."):
                    found.append((p.relative_to(path).as_posix(), p, None))
        if not found:
            raise DataError(
                f"the folder {spec} holds no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))}); "
                "point --data at a text file, a folder of text files, a glob or a JSONL file"
            )
        return found
    raise DataError(f"the data path {spec} does not exist; pass a text file, folder, glob, JSONL or Parquet "
                    f"file, {STDLIB}, {SITE_PACKAGES} or {HUB_PREFIX}owner/name")


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _names_one_file(spec: str) -> bool:
    """Whether a source is a file named directly (not @stdlib, a folder or a glob)."""
    return spec not in (STDLIB, SITE_PACKAGES) and not _is_glob(spec) and Path(spec).expanduser().is_file()


def source_files(spec: str) -> list[tuple[str, Path, str | None]]:
    """(name, path, package) of every file of every source in spec (hub sources have none)."""
    return [entry for part in split_spec(spec) if not part.startswith(HUB_PREFIX) for entry in _files_of(part)]


def iter_documents(spec: str | None, text_field: str = "text", stats: ReadStats | None = None) -> Iterator[Document]:
    """Every document of a spec, one at a time, in a stable order; counts what was read into
    stats (files, duplicates, characters...). Raises DataError on a missing or bad source."""
    spec = spec or STDLIB
    stats = stats if stats is not None else ReadStats()
    seen: set[bytes] | None = set() if deduplicates(spec) else None
    packages: set[str] = set()
    for part in split_spec(spec):
        docs = _hub_documents(part, text_field) if part.startswith(HUB_PREFIX) else \
            _files_documents(_files_of(part), text_field, stats, seen, given=_names_one_file(part))
        for doc in docs:
            stats.documents += 1
            stats.characters += len(doc.text)
            if doc.package is not None and doc.package not in packages:
                packages.add(doc.package)
                stats.packages += 1
            yield doc


def _files_documents(files, text_field: str, stats: ReadStats, seen: set[bytes] | None,
                     given: bool = False) -> Iterator[Document]:
    """Documents of files; given: the one file a source names, refused (not skipped) when it
    is not text."""
    for name, path, package in files:
        if path.suffix.lower() == ".parquet":
            stats.files += 1
            yield from _parquet_documents(name, path, text_field)
            continue
        data = path.read_bytes()
        why = not_text(data)
        if why is not None:
            if given:
                raise DataError(f"{path} is not a text file ({why}); pass a UTF-8 text file, a folder or glob of "
                                "them, a JSONL or a Parquet file")
            stats.not_text += 1
            continue
        stats.files += 1
        text, bad = decode_text(data)
        if bad:
            stats.replaced_bytes += bad
            stats.files_with_replacements += 1
        if not text.strip():
            continue
        if seen is not None:
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(name, path, text, text_field)
        else:
            yield Document(name, text, package)


def read_documents(spec: str | None, text_field: str = "text") -> tuple[list[Document], ReadStats]:
    """All documents of a source in memory, in a stable order, with counts of what was read.
    Raises DataError when the source is missing, malformed or holds no text."""
    spec = spec or STDLIB
    stats = ReadStats()
    docs = list(iter_documents(spec, text_field, stats))
    if not docs:
        raise empty_corpus(spec, stats)
    return docs, stats


def empty_corpus(spec: str, stats: ReadStats) -> DataError:
    skipped = f" ({stats.not_text} more skipped as not text)" if stats.not_text else ""
    return DataError(f"the corpus {spec} is empty: {stats.files} file(s) read{skipped}, no text in them; "
                     "pass files that contain text")


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


def _rows_documents(prefix: str, rows: Iterable, where: str, field: str) -> Iterator[Document]:
    """Documents of a table column's values; row numbers start at 1 like JSONL lines."""
    for i, value in enumerate(rows, start=1):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where} row {i}: column {field!r} is {type(value).__name__}, not text; "
                            "pass --text-field with the column that holds the text")
        if value.strip():
            yield Document(f"{prefix}:{i}", value)


def _parquet_documents(name: str, path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow, which is not installed; run `pip install pyarrow`") from e
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no {field!r} column (it has {', '.join(pf.schema_arrow.names)}); "
                        "pass --text-field with the column that holds the text")

    def rows():  # record batches keep memory bounded on large files
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            yield from batch.column(0).to_pylist()

    yield from _rows_documents(name, rows(), str(path), field)


def parse_hub_spec(spec: str, text_field: str = "text") -> tuple[str, str, str]:
    """`hf:owner/name[:split[:column]]` -> (name, split, column); split defaults to train."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"the hub source {spec!r} is malformed; write {HUB_PREFIX}owner/name[:split[:column]]")
    return parts[0], parts[1] if len(parts) > 1 else "train", parts[2] if len(parts) > 2 else text_field


def _hub_documents(spec: str, text_field: str) -> Iterator[Document]:
    name, split, column = parse_hub_spec(spec, text_field)
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"the hub source {spec} needs the `datasets` library, which is not installed; run "
                        "`pip install datasets`, or download the data set as Parquet/JSONL and pass that file") from e
    # Not streamed: the data set is cached on disk as Arrow (memory-mapped), and the data stage
    # reads it several times (split, tokenizer sample, encoding).
    ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise DataError(f"{spec} has no {column!r} column (it has {', '.join(ds.column_names)}); "
                        f"write {HUB_PREFIX}{name}:{split}:COLUMN")
    yield from _rows_documents(f"{HUB_PREFIX}{name}:{split}", (row[column] for row in ds), spec, column)


def source_fingerprint(spec: str) -> str:
    """Cheap identity of a source: names, sizes and modification times of its files."""
    h = hashlib.sha256()
    parts = split_spec(spec)
    if STDLIB in parts or SITE_PACKAGES in parts:
        h.update(sys.version.encode())
    for part in parts:
        if part.startswith(HUB_PREFIX):
            h.update(f"{part}\n".encode())  # a hub data set is named, not stat'ed
    for name, path, _ in source_files(spec):
        st = path.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
