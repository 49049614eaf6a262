"""Text -> documents -> token shards, and random windows read back through memmap.

Sources: a text file, a folder (searched recursively for text files), a glob, a JSONL file
(one document per line, in a text field), or `@stdlib`, the embedded default corpus: the
Python standard library's own source files of the running interpreter (present on every
machine, no download); see compactgpt.corpus. Documents are split into train and validation
*by document*, by a hash of the document's name, so the split does not depend on file order or
on which other files are present. A source that is a single document is split at a line
boundary instead: its tail is held out.

A prepared data folder holds the tokenizer, `train_000.bin`... and `val_000.bin`... (raw
uint16 when the vocabulary fits, else uint32, `<|endoftext|>` after every document), and a
manifest with the counts.

    split.py     which documents are held out for validation
    shards.py    the shard files: written with a resume record, read as windows (TokenShards)
    tokenize.py  the tokenize stage: prepare_data(DataConfig(...)) -> the data folder
"""

from ..artifacts import register_folder_kind
from ..corpus import (HUB_PREFIX, SITE_PACKAGES, STDLIB, TEXT_SUFFIXES, Document, ReadStats, decode_text, empty_corpus,
                      iter_documents, read_documents, source_fingerprint, stdlib_root)
from .shards import STAGE, TokenShards, is_data_folder, random_windows, token_dtype
from .split import hash_score, held_out_mask, package_held_out, split_documents, unit_score
from .tokenize import (TOKENIZER_SAMPLE_CHARS, DataConfig, encode_documents, prepare_data, prepared_matches,
                       unigram_perplexity)

# What this stage writes: a data folder is told by its manifest (it has no config.json).
register_folder_kind("data", "a tokenizer and token shards (compactgpt tokenize)", lambda files: files.stage == STAGE,
                     rank=0, marker="data manifest")

__all__ = ["HUB_PREFIX", "SITE_PACKAGES", "STAGE", "STDLIB", "TEXT_SUFFIXES", "TOKENIZER_SAMPLE_CHARS", "DataConfig",
           "Document", "ReadStats", "TokenShards", "decode_text", "empty_corpus", "encode_documents", "hash_score",
           "held_out_mask", "is_data_folder", "iter_documents", "package_held_out", "prepare_data",
           "prepared_matches", "random_windows", "read_documents", "source_fingerprint", "split_documents",
           "stdlib_root", "token_dtype", "unigram_perplexity", "unit_score"]
