"""Which documents are held out for validation: decided per document (per package, when it has
one) by a hash of its name, so the split does not depend on file order or on which other files
are present. A source that is a single document is split at a line boundary instead: its tail
is held out."""

from __future__ import annotations

import hashlib

import numpy as np

from ..corpus import Document
from ..errors import DataError


def hash_score(key: str) -> float:
    """Where key falls in [0, 1), from its sha256: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def unit_score(doc: Document) -> float:
    """Where a document falls in [0, 1) for the split: the hash of its package when it has one
    (a package is held out whole, so validation measures code the model never saw a file of),
    else of its name."""
    return hash_score(doc.package if doc.package is not None else doc.name)


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
    for package in sorted(sizes, key=hash_score):
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
    val = held_out_mask([unit_score(d) for d in docs], [hash_score(d.name) for d in docs], val_fraction,
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
